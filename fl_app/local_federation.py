"""A real deployment on one machine: `python -m fl_app.local_federation`.

One `flower-superlink` and any number of `flower-supernode`s on 127.0.0.1, each a real
Flower process, with TLS and SuperNode authentication on, set up exactly as
docs/deployment.md does it across machines: the coordinator's and each partner's start
kit (`fl_app.kit`), each partner's key made by its kit's start script, registered with
`flwr supernode register`, the run submitted with `flwr run`. Used by the deployment
tests and benchmark, and by anyone who wants to see a deployment work before involving
partners:

    python -m fl_app.local_federation --nodes 2 --overrides "num_rounds=3"

Everything lives in one work directory (the kits, keys, the SuperLink's state database,
one log per process); every process runs in its own process group and is stopped, with
its children, when the federation closes.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fl_app.kit import CONNECTION, write_coordinator_kit, write_partner_kit

BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode of this environment
APP_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FederationError(RuntimeError):
    """A Flower process did not start, or a run did not finish."""


class LocalFederation:
    """A SuperLink and SuperNodes under `workdir`; use as a context manager."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.dir = Path(workdir)
        self.logs = self.dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.coordinator = write_coordinator_kit(self.dir / "coordinator", (), self.port, bind="127.0.0.1")
        self.certs = self.coordinator / "certs"
        self.env = {
            **os.environ,
            **(env or {}),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "FLWR_HOME": str(self.coordinator / "flwr"),  # the kit's connection, never the user's ~/.flwr
            # The app's dependencies are this environment's: no `uv sync` per run.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_process(self, name: str, command: list[str], ready: str | None = None,
                      timeout: float = 60) -> subprocess.Popen:
        """Start `command` logging to logs/<name>.log (stopped by `close`); unless `ready`
        is None, wait until the log matches it."""
        with open(self.logs / f"{name}.log", "w") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=self.env, start_new_session=True)
        self.processes[name] = process
        if ready is not None:
            self.wait_for(name, ready, timeout)
        return process

    def wait_for(self, name: str, ready: str, timeout: float) -> None:
        """Wait until process `name`'s log matches `ready`; stop it and raise if it ends
        or `timeout` passes first."""
        process, deadline = self.processes[name], time.monotonic() + timeout
        while not re.search(ready, self.log(name)):
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop(name)
                raise FederationError(f"{name} did not start (see {self.logs / name}.log):\n"
                                      + self.log(name)[-2000:])
            time.sleep(0.2)

    def start_superlink(self) -> None:
        """The coordinator's SuperLink, through its kit's start script: TLS, SuperNode
        authentication, state on disk (a restarted SuperLink keeps its nodes and runs)."""
        self.start_process("superlink", ["sh", str(self.coordinator / "start-superlink.sh")],
                           ready=r"Uvicorn running on https://", timeout=60)

    def kit(self, name: str, *, image_dir: str | None = None, partition: tuple[int, int] | None = None,
            overrides: str = "", superlink_port: int | None = None) -> Path:
        """Partner `name`'s kit (fl_app.kit), its data its own images or a partition of a
        dataset; superlink_port: dial this port instead of the SuperLink's (e.g. a relay
        that counts the bytes). The key is made by the kit's script, as at a partner."""
        kit = write_partner_kit(self.dir / "kits" / name, name, f"127.0.0.1:{superlink_port or self.port}",
                                self.certs / "ca.crt", image_dir=image_dir, partition=partition,
                                data_dir=self.env.get("FL_APP_DATA_DIR", ""), overrides=overrides,
                                local_port=free_port(),  # each SuperNode serves its own Runtime API
                                python=sys.executable, restart_delay=2)
        subprocess.run(["sh", str(kit / "start.sh"), "key"], env=self.env, check=True,
                       capture_output=True, timeout=60)
        return kit

    def node_key(self, name: str) -> Path:
        """Partner `name`'s private key, made by its kit; the public key is next to it (.pub)."""
        return self.dir / "kits" / name / "keys" / name

    def register(self, name: str) -> None:
        """The coordinator registers the partner's public key: `flwr supernode register`."""
        self.flwr("supernode", "register", str(self.node_key(name).with_name(f"{name}.pub")), CONNECTION,
                  "--name", name)

    def start_node(self, name: str, wait: bool = True) -> subprocess.Popen:
        """Partner `name`'s SuperNode, started by its kit's start script (which checks the
        data first, and starts flower-supernode again whenever it stops); logs/<name>.log.
        wait=False returns at once (`wait_for_node` waits)."""
        process = self.start_process(name, ["sh", str(self.dir / "kits" / name / "start.sh")])
        if wait:
            self.wait_for_node(name)
        return process

    def wait_for_node(self, name: str) -> None:
        self.wait_for(name, r"SuperNode ID: \d+", timeout=180)

    def supernode_pid(self, name: str) -> int:
        """The pid of partner `name`'s running flower-supernode (its kit's script records it)."""
        return int((self.dir / "kits" / name / "supernode.pid").read_text())

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop a process and its children (SuperExec, flwr-serverapp / flwr-clientapp)."""
        process = self.processes.pop(name, None)
        if process is None:
            return
        for signal_number in (sig, signal.SIGKILL):
            try:
                os.killpg(process.pid, signal_number)
                process.wait(timeout=20)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode:
            raise FederationError(f"flwr {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result

    def submit(self, overrides: str, app_dir: Path = APP_DIR) -> subprocess.Popen:
        """Start `flwr run APP CONNECTION --stream` with Hydra `overrides`; logs/run.log."""
        return self.start_process("run", ["flwr", "run", str(app_dir), CONNECTION, "--stream",
                                          "--run-config", f'overrides="{overrides}"'])

    def run(self, overrides: str, app_dir: Path = APP_DIR, timeout: float = 600,
            echo: Callable[[str], None] | None = None) -> str:
        """Submit a run, wait for its end, return its log; `echo` gets each line of the log
        as it comes (the run's header, a line per round, warnings).

        Raises `FederationError`, its reason last, if the run did not finish successfully
        (`flwr run` itself exits 0 even when the ServerApp fails, so its status is asked
        from the SuperLink).
        """
        process = self.submit(overrides, app_dir)
        deadline = time.monotonic() + timeout
        with open(self.logs / "run.log", errors="replace") as log_file:
            pending = ""  # read from the log, not yet a whole line
            while True:
                returncode = process.poll()
                if echo:  # the whole lines written so far; once the run has ended, all of them
                    *lines, pending = (pending + log_file.read()).split("\n")
                    if returncode is not None and pending:
                        lines, pending = [*lines, pending], ""
                    for line in lines:
                        echo(line)
                if returncode is not None:
                    break
                if time.monotonic() > deadline:
                    self.stop("run", signal.SIGKILL)
                    raise FederationError(f"run still going after {timeout} s:\n{self.log('run')[-3000:]}")
                time.sleep(0.5)
        output = self.log("run")
        started = re.search(r"Successfully started run (\d+)", output)
        if returncode or not started:
            raise FederationError(f"flwr run failed:\n{output[-3000:]}")
        listing = json.loads(self.flwr("list", CONNECTION, "--run-id", started.group(1),
                                       "--format", "json").stdout)
        run = listing["runs"][0]
        if run["status"] != "finished:completed":
            raise FederationError(f"{output[-3000:]}\nRun {started.group(1)} ended {run['status']}: "
                                  f"{run.get('status-details', '')}")
        return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fl_app.local_federation",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes, each holding one "
                        "partition of the dataset (default 2)")
    parser.add_argument("--overrides", default="", help="Hydra overrides of the run, e.g. "
                        "'num_rounds=3 dataset=fashion_mnist'")
    parser.add_argument("--workdir", type=Path, help="certificates, keys, logs and state "
                        "(default: a new temporary directory)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fl_app_federation_"))
    output_dir = workdir / "outputs"
    overrides = (f"mode=deployment num_clients={args.nodes} min_fit_clients={args.nodes} "
                 f"min_evaluate_clients={args.nodes} output_dir={output_dir} {args.overrides}")
    with LocalFederation(workdir) as federation:
        federation.start_superlink()
        names = [f"node{i}" for i in range(args.nodes)]
        for i, name in enumerate(names):
            federation.kit(name, partition=(i, args.nodes), overrides=overrides)
            federation.register(name)
            federation.start_node(name, wait=False)  # their data checks run side by side
        for name in names:
            federation.wait_for_node(name)
        print(f"SuperLink on 127.0.0.1:{federation.port}, {args.nodes} SuperNodes; logs in "
              f"{federation.logs}", flush=True)
        try:
            federation.run(overrides, echo=lambda line: print(line, flush=True))
        except FederationError as err:
            sys.exit(str(err).rpartition("\n")[2])  # the log was echoed: the reason alone
    print(f"Outputs in {output_dir}")


if __name__ == "__main__":
    main()
