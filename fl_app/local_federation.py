"""A real deployment on one machine: `python -m fl_app.local_federation`.

One `flower-superlink` and any number of `flower-supernode`s on 127.0.0.1, each a real
Flower process, with TLS and SuperNode authentication on, set up exactly as
docs/deployment.md does it across machines (certificates and keys from
`fl_app.certificates`, keys registered with `flwr supernode register`, the run submitted
with `flwr run`). Used by the deployment tests and benchmark, and by anyone who wants to
see a deployment work before involving partners:

    python -m fl_app.local_federation --nodes 2 --overrides "num_rounds=3"

Everything lives in one work directory (certificates, keys, `FLWR_HOME`, the SuperLink's
state database, one log per process); every process runs in its own process group and is
stopped, with its children, when the federation closes.
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
from pathlib import Path

from fl_app.certificates import make_ca, make_node_key, make_server_certificate

CONNECTION = "local-tls"  # the connection's name in FLWR_HOME/config.toml
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
        self.certs = self.dir / "certs"
        make_ca(self.certs)
        make_server_certificate(self.certs, ())
        self.port = free_port()
        flwr_home = self.dir / "flwr-home"
        flwr_home.mkdir(exist_ok=True)
        # The CLI's connection (Flower 1.42 reads connections from FLWR_HOME/config.toml).
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'
        )
        self.env = {
            **os.environ,
            **(env or {}),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "FLWR_HOME": str(flwr_home),  # never the user's ~/.flwr
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

    def _start(self, name: str, command: list[str], ready: str | None = None,
               timeout: float = 60) -> subprocess.Popen:
        """Start `command` logging to logs/<name>.log (stopped by `close`); unless `ready`
        is None, wait until the log matches it."""
        with open(self.logs / f"{name}.log", "w") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=self.env, start_new_session=True)
        self.processes[name] = process
        if ready is None:
            return process
        deadline = time.monotonic() + timeout
        while not re.search(ready, self.log(name)):
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop(name)
                raise FederationError(f"{name} did not start (see {self.logs / name}.log):\n"
                                      + self.log(name)[-2000:])
            time.sleep(0.2)
        return process

    def start_superlink(self) -> None:
        """The coordinator's SuperLink: TLS, SuperNode authentication, state on disk
        (a restarted SuperLink keeps its registered nodes and runs)."""
        self._start("superlink", [
            "flower-superlink",
            "--ssl-ca-certfile", str(self.certs / "ca.crt"),
            "--ssl-certfile", str(self.certs / "server.pem"),
            "--ssl-keyfile", str(self.certs / "server.key"),
            "--enable-supernode-auth",
            "--database", str(self.dir / "state.db"),
            "--host", "127.0.0.1", "--port", str(self.port),  # Fleet, Control and Runtime APIs
        ], ready=r"Uvicorn running on https://", timeout=60)

    def node_key(self, name: str) -> Path:
        """The node's private key (made on first use); its public key is next to it (.pub)."""
        key = self.dir / "keys" / name
        if not key.exists():
            make_node_key(key)
        return key

    def register(self, name: str) -> None:
        """The coordinator registers the node's public key: `flwr supernode register`."""
        public_key = self.node_key(name).with_name(f"{name}.pub")
        self.flwr("supernode", "register", str(public_key), CONNECTION)

    def start_node(self, name: str, node_config: str, *, tls: bool = True, wait: bool = True,
                   superlink_port: int | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        """A partner's SuperNode with its own key and `node_config` (where its data is).

        wait=False returns at once (for nodes expected to be refused); superlink_port: dial
        this port instead of the SuperLink's (e.g. a relay that counts the bytes)."""
        command = [
            "flower-supernode",
            "--superlink", f"127.0.0.1:{superlink_port or self.port}",
            "--auth-supernode-private-key", str(self.node_key(name)),
            "--node-config", node_config,
            "--port", str(free_port()),  # each SuperNode serves its own Runtime API
            *(["--root-certificates", str(self.certs / "ca.crt")] if tls else ["--insecure"]),
            *extra,
        ]
        return self._start(name, command, ready=r"SuperNode ID: \d+" if wait else None)

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
        return self._start("run", ["flwr", "run", str(app_dir), CONNECTION, "--stream",
                                   "--run-config", f'overrides="{overrides}"'])

    def run(self, overrides: str, app_dir: Path = APP_DIR, timeout: float = 600) -> str:
        """Submit a run, wait for its end, return its log.

        Raises `FederationError` if the run did not finish successfully (`flwr run` itself
        exits 0 even when the ServerApp fails, so its status is asked from the SuperLink).
        """
        process = self.submit(overrides, app_dir)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop("run", signal.SIGKILL)
            raise FederationError(f"run still going after {timeout} s:\n{self.log('run')[-3000:]}")
        output = self.log("run")
        started = re.search(r"Successfully started run (\d+)", output)
        if returncode or not started:
            raise FederationError(f"flwr run failed:\n{output[-3000:]}")
        listing = json.loads(self.flwr("list", CONNECTION, "--run-id", started.group(1),
                                       "--format", "json").stdout)
        status = listing["runs"][0]["status"]
        if status != "finished:completed":
            raise FederationError(f"run {started.group(1)} ended {status}:\n{output[-3000:]}")
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
        for i in range(args.nodes):
            federation.register(f"node{i}")
            federation.start_node(f"node{i}", f"partition-id={i} num-partitions={args.nodes}")
        print(f"SuperLink on 127.0.0.1:{federation.port}, {args.nodes} SuperNodes; logs in "
              f"{federation.logs}", flush=True)
        try:
            print(federation.run(overrides))
        except FederationError as err:
            sys.exit(str(err))
    print(f"Outputs in {output_dir}")


if __name__ == "__main__":
    main()
