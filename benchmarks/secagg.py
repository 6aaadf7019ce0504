"""What SecAgg+ costs per round against plain aggregation, with 10 and 50 clients.

    FL_APP_DATA_DIR=../shared/datasets python -m benchmarks.secagg [--rounds 3]

Each setting is a simulation of the seed CNN on MNIST (IID, every client trains every
round, E=1, B=32), run once with `privacy=none` and once with `privacy=secagg` (its
defaults: 3 shares, threshold 2). Seconds per round: median (min-max) of rounds 2..N.
Bytes: what each client receives and sends per round, as Flower's own `message_size_mod`
counts the messages' records (for SecAgg+: its four stages).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fl_app.local_federation import APP_DIR

RUN = """
import sys
from flwr.client.mod import message_size_mod
from flwr.simulation import run_simulation
from fl_app.client_app import build_client_app
from fl_app.config import compose_config
from fl_app.server_app import build_server_app

cfg = compose_config(sys.argv[1:])
run_simulation(server_app=build_server_app(cfg),
               client_app=build_client_app(cfg, mods=(message_size_mod,)),
               num_supernodes=cfg.num_clients,
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
"""


def measure(num_clients: int, privacy: str, rounds: int, workdir: Path) -> tuple[list[float], float]:
    """(seconds of rounds 2..N, bytes per client per round)."""
    out = workdir / f"{privacy}_{num_clients}"
    result = subprocess.run(
        [sys.executable, "-c", RUN, f"num_clients={num_clients}", f"num_rounds={rounds}",
         "fraction_evaluate=0", "min_evaluate_clients=0", f"privacy={privacy}", f"output_dir={out}"],
        cwd=APP_DIR, capture_output=True, text=True, check=True,
        env={**os.environ, "RAY_DEDUP_LOGS": "0"},  # every client's size line, not a summary
    )
    sizes = [int(n) for n in re.findall(r"(?:Incoming|Outgoing) message size: (\d+) bytes",
                                        result.stdout + result.stderr)]
    history = json.loads((out / "metrics.json").read_text())
    return [r["round_seconds"] for r in history[1:]], sum(sizes) / (rounds * num_clients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| clients | aggregation | seconds per round | MB per client per round |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for num_clients in (10, 50):
            plain_seconds, plain_bytes = measure(num_clients, "none", args.rounds, Path(tmp))
            secure_seconds, secure_bytes = measure(num_clients, "secagg", args.rounds, Path(tmp))
            for name, seconds, size in (("plain", plain_seconds, plain_bytes),
                                        ("SecAgg+", secure_seconds, secure_bytes)):
                ratio = statistics.median(seconds) / statistics.median(plain_seconds)
                print(f"| {num_clients} | {name} | {statistics.median(seconds):.1f} "
                      f"({min(seconds):.1f}-{max(seconds):.1f}), {ratio:.2f}x | "
                      f"{size / 1e6:.2f} ({size / plain_bytes:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
