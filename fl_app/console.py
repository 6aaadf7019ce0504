"""What the console shows of a run: fl_app's own lines and every warning.

Flower logs five lines a round around fl_app's one and libraries raise deprecation warnings
that users cannot act on. The run's log file keeps every logged line (`run_simulation.py`:
run_simulation.log; `flwr run`: server.log in the run's directory); `verbose=true` shows
them on the console too. (TensorFlow's C++ start-up lines are off in every process:
fl_app/__init__.py; the Ray workers' output stays in Ray's logs: fl_app/simulation.py.)
"""

import logging
import os
import sys
import tempfile

FL_APP_DIR = os.path.dirname(os.path.abspath(__file__))


# Warnings for the developers of fl_app's libraries, not for its users (the log file keeps them).
DEVELOPER_NOTICES = ("DeprecationWarning", "FutureWarning", "DEPRECATED FEATURE")


class ReportedError(RuntimeError):
    """An error whose reason fl_app has logged: the console shows no traceback of it."""


class ConsoleFilter(logging.Filter):
    """Pass fl_app's INFO lines (but those logged with `extra=FILE_ONLY`) and the warnings
    and errors of anyone, except deprecation notices meant for developers and tracebacks of
    a `ReportedError`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ReportedError):
            return False
        if record.levelno >= logging.WARNING:
            message = record.getMessage()
            return not any(notice in message for notice in DEVELOPER_NOTICES)
        return record.pathname.startswith(FL_APP_DIR) and not getattr(record, "file_only", False)


# `log(INFO, ..., extra=FILE_ONLY)`: a line for the log file, not the console.
FILE_ONLY = {"file_only": True}


def quiet_console() -> None:
    """Filter the console handlers of the root logger (Hydra's), route Python's warnings
    into the log, where the filter sees them, and import TensorFlow into the log too."""
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # not a FileHandler, its subclass
            handler.addFilter(ConsoleFilter())
    import_tensorflow_into_the_log()


def quiet_flower_stream(log_file: str | os.PathLike, verbose: bool) -> None:
    """Under `flwr run`: every line Flower's logger gets also goes to `log_file`, and unless
    `verbose` its console handler, whose output `flwr run --stream` shows, passes only what
    `ConsoleFilter` passes. Once per process (each run has its own ServerApp process)."""
    from flwr.common.logger import console_handler

    flwr_logger = logging.getLogger("flwr")
    if any(isinstance(h, logging.FileHandler) for h in flwr_logger.handlers):
        return
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    flwr_logger.addHandler(handler)
    if not verbose:
        console_handler.addFilter(ConsoleFilter())


def import_tensorflow_into_the_log() -> None:
    """TensorFlow 2.21 writes its C++ start-up lines to the process's stderr as it loads,
    before any setting can silence them (absl logs everything until it is initialised), so
    it is imported here with stderr going to a file whose lines then go to the log."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401  (imported for its start-up)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        lines = captured.read().decode(errors="replace").strip()
    if lines:
        logging.getLogger(__name__).info("TensorFlow's start-up:\n%s", lines, extra=FILE_ONLY)
