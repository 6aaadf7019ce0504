"""Running `run_simulation.py` from a benchmark: one place for the command, its timing and
its records."""

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def simulate(run_dir: Path, *overrides: str) -> tuple[list[dict], float, str]:
    """Run `run_simulation.py overrides...` with its output in `run_dir`; its metrics.json
    records, its wall time and its command."""
    cmd = [sys.executable, "run_simulation.py", *overrides, f"hydra.run.dir={run_dir}"]
    command = shlex.join(["python", *cmd[1:]])
    print(f"$ {command}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return json.loads((run_dir / "metrics.json").read_text()), wall, command
