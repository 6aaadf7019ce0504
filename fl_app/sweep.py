"""Hydra multirun sweeps: every job's config checked first, then one table and one plot
comparing every job.

`python run_simulation.py -m seed=1,2 local_epochs=1,5` checks the configs of all four jobs
before the first one trains (`SweepCheck`), and writes, next to the job directories,
`summary.csv`, `summary.md` (one row per job) and `summary.png` (every job's accuracy per
round: on the test set, or the clients' held-out images for a task without one); when jobs
ran with central DP, `privacy.png` (final accuracy against the ε each spent). No Flower or TensorFlow here: Hydra loads these callbacks in every run, also
in one that stops at a bad config within a second.
"""

import csv
import fcntl
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # fl_app/library_patches.py, RELIANCES
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig, OmegaConf

from fl_app.config import to_simulation_config
from fl_app.config_schema import ConfigError
from fl_app.data import DatasetError

log = logging.getLogger(__name__)

# Per job: its number, overrides and Hydra's status. Hydra's own `.hydra/overrides.yaml`
# is off here (`hydra.output_subdir: null`: the app writes config.yaml itself).
JOB_FILE = "job.yaml"
COLUMNS = (
    "job",
    "overrides",
    "status",
    "final_accuracy",
    "best_accuracy",
    "accuracy_of",  # test set: the server's; clients: their held-out images (no test set)
    "best_round",
    "rounds_to_target",
    "rounds_completed",
    "train_seconds",  # sum of round_seconds: without start-up of Ray and TensorFlow
    "final_epsilon",  # privacy spent (central DP runs only)
)
ACCURACY_COLUMNS = {"final_accuracy", "best_accuracy"}
# Hydra's job status; UNKNOWN: the job is running, or was killed.
STATUS = {JobStatus.COMPLETED.name: "ok", JobStatus.FAILED.name: "failed"}


class SweepCheck(Callback):
    """Hydra callback (conf/config.yaml, `hydra.callbacks`) that checks every job's config
    before a multirun starts: a bad value in the last job stops the sweep before the first
    job trains, naming the job and the key. Hydra itself checks only that each job's config
    composes; fl_app's checks (`to_simulation_config`) would otherwise run in each job as it starts.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The jobs as Hydra's basic sweeper (the one fl_app runs) expands them, with its own
        # code: the sweeper's `params`, then the command line's overrides.
        params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
        overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
        for num, job in enumerate(BasicSweeper.split_arguments(overrides, max_batch_size=None)[0]):
            try:
                to_simulation_config(compose(config_name=config.hydra.job.config_name, overrides=job), job)
            except (ConfigError, DatasetError) as err:
                log.error("Sweep job %s (%s): %s. No job has run.", num, " ".join(job), err)
                sys.exit(2)  # Hydra turns exceptions in callbacks into warnings, not this


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml, `hydra.callbacks`) that summarises each multirun.

    The summary is rewritten after every job as well as at the end: Hydra skips
    `on_multirun_end` when a job has failed, and a summary should show that job most of
    all. With a parallel launcher the job hooks run in its worker processes, so all that
    the summary needs is in files. Hydra turns an exception in a callback into a warning:
    the summary can never stop a sweep.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Written before the app runs: a job that exits early still has a row.
        if config.hydra.mode == RunMode.MULTIRUN:
            _write_job_file(config, JobStatus.UNKNOWN)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            _write_job_file(config, job_return.status)
            _summarise_exclusively(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        _summarise_exclusively(sweep_dir)
        log.info("Sweep summary in %s/summary.{csv,md,png}:\n%s", sweep_dir,
                 (sweep_dir / "summary.md").read_text().rstrip())


def _write_job_file(config: DictConfig, status: JobStatus) -> None:
    job = {"num": config.hydra.job.num, "overrides": list(config.hydra.overrides.task),
           "status": status.name}
    OmegaConf.save(job, Path(config.hydra.runtime.output_dir) / JOB_FILE)


def _summarise_exclusively(sweep_dir: Path) -> None:
    """`summarise` under a lock on the sweep directory: parallel jobs end at the same time,
    and the last one to write must also be the last one to read the job directories."""
    fd = os.open(sweep_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        summarise(sweep_dir)
    finally:
        os.close(fd)  # releases the lock


def summarise(sweep_dir: Path) -> None:
    """Write summary.csv, summary.md and summary.png for the jobs found in `sweep_dir`."""
    jobs = sorted(
        (OmegaConf.to_container(OmegaConf.load(path)) | {"dir": path.parent}
         for path in sweep_dir.rglob(JOB_FILE)),
        key=lambda job: job["num"],
    )
    # Overrides shared by every job say nothing about one job: only the others label it.
    shared = set.intersection(*(set(job["overrides"]) for job in jobs)) if len(jobs) > 1 else set()
    rows, curves, targets = [], [], set()
    for job in jobs:
        label = " ".join(o for o in job["overrides"] if o not in shared) or f"job {job['num']}"
        history, target = _read_job(job["dir"])
        rows.append(_row(job, label, history, target))
        if history:
            curves.append((label, history))
        if target is not None:
            targets.add(target)

    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(_markdown(rows))
    _plot(curves, targets, sweep_dir / "summary.png")
    private = [row for row in rows if row.get("final_epsilon", "") != "" and row.get("final_accuracy", "") != ""]
    if private:
        _plot_privacy(private, sweep_dir / "privacy.png")


def _read_job(job_dir: Path) -> tuple[list[dict] | None, float | None]:
    """The job's round records (None without metrics.json) and its target_accuracy."""
    metrics, config = job_dir / "metrics.json", job_dir / "config.yaml"
    history = json.loads(metrics.read_text()) if metrics.exists() else None
    target = OmegaConf.load(config).get("target_accuracy") if config.exists() else None
    return history, target


def accuracy_key(history: list[dict]) -> str:
    """Where a run's accuracy is in its round records: the server's test accuracy, or for a
    task without a test set the clients' held-out (federated) accuracy."""
    return "test_accuracy" if any("test_accuracy" in r for r in history) else "eval_accuracy"


def _row(job: dict, label: str, history: list[dict] | None, target: float | None) -> dict:
    row = {"job": job["num"], "overrides": label}
    if history is None:
        return row | {"status": "failed: no metrics.json"}
    key = accuracy_key(history)
    evaluated = [r for r in history if key in r]
    best = max(evaluated, key=lambda r: r[key], default={})
    if target is None:
        to_target = ""
    else:
        to_target = next((r["round"] for r in evaluated if r[key] >= target), "not reached")
    return row | {
        "status": STATUS.get(job["status"], "not finished"),
        "final_accuracy": evaluated[-1][key] if evaluated else "",
        "best_accuracy": best.get(key, ""),
        "accuracy_of": "test set" if key == "test_accuracy" else "clients",
        "best_round": best.get("round", ""),
        "rounds_to_target": to_target,
        "rounds_completed": len(history),
        "train_seconds": round(sum(r.get("round_seconds", 0.0) for r in history), 1),
        "final_epsilon": history[-1].get("epsilon", "") if history else "",
    }


def _markdown(rows: list[dict]) -> str:
    def cell(column: str, value: object) -> str:
        if value == "":
            return "-"
        if column in ACCURACY_COLUMNS:
            return f"{value:.4f}"
        if column == "final_epsilon":
            return f"{value:.3g}"
        return str(value).replace("|", r"\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c, row.get(c, "")) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _plot(curves: list[tuple[str, list[dict]]], targets: set[float], path: Path) -> None:
    """Each job's accuracy per round (`accuracy_key`), one line per job; dashed lines at the
    target accuracies."""
    fig = Figure(figsize=(8, 5))  # not pyplot: no global state; PNG is drawn by Agg
    ax = fig.subplots()
    for label, history in curves:
        key = accuracy_key(history)
        points = [(r["round"], r[key]) for r in history if key in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    for target in sorted(targets):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="round", ylabel="accuracy (test set, or the clients' without one)",
           title="Accuracy per round, per job")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_privacy(rows: list[dict], path: Path) -> None:
    """Final accuracy against the ε spent, one point per DP job: the trade-off."""
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for row in rows:
        ax.plot(row["final_epsilon"], row["final_accuracy"], marker="o", color="tab:blue")
        ax.annotate(row["overrides"], (row["final_epsilon"], row["final_accuracy"]),
                    fontsize="x-small", textcoords="offset points", xytext=(4, 4))
    ax.set(xscale="log", xlabel="epsilon spent (log scale)", ylabel="final accuracy",
           title="Privacy-utility trade-off, one point per job")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
