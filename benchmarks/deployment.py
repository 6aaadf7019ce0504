"""Deployment vs simulation on this machine: seconds per round and bytes per client.

    FL_APP_DATA_DIR=../shared/datasets python -m benchmarks.deployment [--rounds 6]

The same federation both ways: 2 clients per round, each holding 1/20 of MNIST's
training set (3,000 images), the seed CNN, E=1, B=32, centralised evaluation only.
- deployment: `fl_app.local_federation` (a real SuperLink and 2 SuperNodes on 127.0.0.1,
  TLS and node authentication on);
- simulation: `run_simulation.py` with 20 virtual clients, 2 sampled per round.
Seconds per round: median (min-max) of rounds 2..N (round 1 includes start-up). Bytes: what
a SuperNode and the SuperLink exchange (TLS included) per round, counted by a relay each
SuperNode dials instead of the SuperLink: the traffic that crosses the network between a
partner and the coordinator. Counted between the ends of round 1 and round N.
"""

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fl_app.local_federation import APP_DIR, LocalFederation, free_port

NODES = 2
COMMON = f"num_rounds={{rounds}} fraction_evaluate=0 min_evaluate_clients=0 min_fit_clients={NODES}"
MODEL_BYTES = 693_962 * 4  # the seed CNN's float32 weights


class CountingRelay:
    """A TCP relay from a free port to `target_port` on 127.0.0.1, counting the bytes it
    forwards (both directions), in a background thread."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.bytes = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    async def _relay(self, reader, writer) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except ConnectionError:  # the SuperLink is gone (the federation is closing)
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, target_writer), self._pipe(target_reader, writer))

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(1 << 16):
                self.bytes += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def round_seconds(metrics_file: Path) -> list[float]:
    return [r["round_seconds"] for r in json.loads(metrics_file.read_text())[1:]]


def bytes_at_round_ends(metrics_file: Path, relays: list[CountingRelay], rounds: int,
                        stop: threading.Event) -> list[int]:
    """The relays' byte count whenever metrics.json gains a round (run in a thread)."""
    samples, seen = [], 0
    while not stop.is_set() and seen < rounds:
        try:
            done = len(json.loads(metrics_file.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or mid-write
            done = seen
        if done > seen:
            samples.append(sum(relay.bytes for relay in relays))
            seen = done
        time.sleep(0.05)
    return samples


def deployment(workdir: Path, rounds: int) -> tuple[list[float], float]:
    out = workdir / "deployment"
    with LocalFederation(workdir / "federation") as federation:
        federation.start_superlink()
        relays = [CountingRelay(federation.port) for _ in range(NODES)]
        for i, relay in enumerate(relays):
            federation.kit(f"node{i}", partition=(i, 20), superlink_port=relay.port)
            federation.register(f"node{i}")
            federation.start_node(f"node{i}", wait=False)
        for i in range(NODES):
            federation.wait_for_node(f"node{i}")
        stop, counts = threading.Event(), []
        watcher = threading.Thread(target=lambda: counts.extend(
            bytes_at_round_ends(out / "metrics.json", relays, rounds, stop)))
        watcher.start()
        try:
            federation.run(f"mode=deployment num_clients={NODES} {COMMON.format(rounds=rounds)} "
                           f"output_dir={out}")
        finally:
            stop.set()
            watcher.join()
    per_client_round = (counts[-1] - counts[0]) / (len(counts) - 1) / NODES
    return round_seconds(out / "metrics.json"), per_client_round


# What every `flwr-clientapp` process does: a SuperNode starts one per message.
CLIENT_PROCESS = """
import time
started = time.perf_counter()
from fl_app.client_app import load_node_data
from fl_app.config import compose_config
from fl_app import model
imported = time.perf_counter()
cfg = compose_config(["mode=deployment"])
data = load_node_data({"partition-id": 0, "num-partitions": 20}, cfg)
loaded = time.perf_counter()
net = model.build_model(cfg.model.name, (28, 28, 1), 10, cfg.optimizer, cfg.loss, 1e-3,
                        steps_per_execution=cfg.steps_per_execution)  # as each worker does
built = time.perf_counter()
model.train(net, data.x_train, data.y_train, epochs=1, batch_size=32, learning_rate=0.002, seed=0)
trained = time.perf_counter()
print(imported - started, loaded - imported, built - loaded, trained - built)
"""


def client_process_seconds() -> list[float]:
    """(imports, config + data, model build, training) seconds of one fresh ClientApp process."""
    result = subprocess.run([sys.executable, "-c", CLIENT_PROCESS], capture_output=True, text=True,
                            check=True, cwd=APP_DIR)
    return [float(x) for x in result.stdout.split()[-4:]]


def simulation(workdir: Path, rounds: int) -> list[float]:
    out = workdir / "simulation"
    subprocess.run(
        [sys.executable, str(APP_DIR / "run_simulation.py"), "num_clients=20", "fraction_fit=0.1",
         *COMMON.format(rounds=rounds).split(), f"output_dir={out}", f"hydra.run.dir={out}"],
        check=True, capture_output=True, cwd=APP_DIR,
    )
    return round_seconds(out / "metrics.json")


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    print(f"rounds 2..{args.rounds}, {NODES} clients of 3,000 MNIST images, E=1, B=32", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        deployed, bytes_per_client = deployment(Path(tmp), args.rounds)
        print(f"deployment: {summary(deployed)} per round", flush=True)
        simulated = simulation(Path(tmp), args.rounds)
    imports, data, build, train = client_process_seconds()
    print(f"simulation: {summary(simulated)} per round")
    print(f"deployment: {summary(deployed)} per round "
          f"({statistics.median(deployed) / statistics.median(simulated):.2f}x simulation)")
    print(f"a fresh ClientApp process (one per message in deployment): {imports:.1f} s imports, "
          f"{data:.1f} s config and data, {build:.1f} s model, {train:.1f} s training "
          f"= {imports + data + build + train:.1f} s")
    print(f"deployment: {bytes_per_client / 1e6:.2f} MB between each SuperNode and the SuperLink "
          f"per round ({bytes_per_client / (2 * MODEL_BYTES):.2f}x the {2 * MODEL_BYTES / 1e6:.2f} MB "
          "of float32 weights sent and returned)")


if __name__ == "__main__":
    main()
