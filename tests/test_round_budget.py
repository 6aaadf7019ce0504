"""benchmarks.round_budget: client mods reach every simulated call, and the budget adds up."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from benchmarks.round_budget import DISPATCH, FIT_FIXED, GAPS, REST, SERVER, TRAINING, WAITING, budget


def call(worker, round_, created, start, end, cpu, training):
    return {"worker": worker, "type": "train", "round": str(round_), "created": created,
            "start": start, "end": end, "cpu": cpu, "training": training}


def test_budget_splits_each_workers_round_into_its_parts():
    calls = [
        call(1, 1, 0.0, 0.1, 10.0, 9.0, 9.5), call(2, 1, 0.0, 0.1, 9.5, 9.0, 9.0),
        # Round 2 runs from the last reply of round 1 (10.0) to its own last reply (12.0).
        call(1, 2, 10.1, 10.15, 11.0, 0.8, 0.8), call(1, 2, 10.1, 11.02, 12.0, 0.9, 0.9),
        call(2, 2, 10.1, 10.2, 11.9, 1.6, 1.6),
        {**call(2, 2, 10.1, 12.0, 12.1, 0.1, 0.1), "type": "evaluate"},  # not training: left out
    ]
    shares, cpu_per_second, round_seconds = budget(calls, fit_fixed_cost=0.01)
    assert round_seconds == pytest.approx([2.0])
    seconds = {part: share * 4.0 for part, share in shares.items()}  # 2 workers x 2 s
    assert seconds[TRAINING] == pytest.approx(0.8 + 0.9 + 1.6 - 3 * 0.01)
    assert seconds[FIT_FIXED] == pytest.approx(3 * 0.01)
    assert seconds[REST] == pytest.approx(0.05 + 0.08 + 0.1)
    assert seconds[GAPS] == pytest.approx(0.02)
    assert seconds[SERVER] == pytest.approx(0.2)
    assert seconds[DISPATCH] == pytest.approx(0.05 + 0.1)
    assert seconds[WAITING] == pytest.approx(0.1)
    assert cpu_per_second == pytest.approx((0.8 + 0.9 + 1.6) / (0.85 + 0.98 + 1.7))


@pytest.mark.slow
def test_client_mods_time_every_training_call_of_a_real_simulation(tmp_path):
    script = f"""
from pathlib import Path
from benchmarks.round_budget import call_timer
from fl_app.config import compose_config
from fl_app.simulation import simulate
folder = Path({str(tmp_path)!r})
cfg = compose_config(["num_clients=20", "fraction_fit=0.1", "fraction_evaluate=0",
                      "num_rounds=2", "output_dir=" + str(folder / "run")])
simulate(cfg, (call_timer(folder),))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [json.loads(line) for path in tmp_path.glob("*.jsonl") for line in path.read_text().splitlines()]
    assert sorted((c["round"], c["type"]) for c in calls) == [("1", "train")] * 2 + [("2", "train")] * 2
    assert all(c["created"] <= c["start"] < c["end"] and c["cpu"] > 0 for c in calls)
    # Training is timed inside each call; once the worker has its data and model, it is most of it.
    assert all(0 < c["training"] < c["end"] - c["start"] for c in calls)
    assert all(c["training"] > 0.5 * (c["end"] - c["start"]) for c in calls if c["round"] == "2")
    shares, cpu_per_second, (seconds,) = budget(calls)
    assert min(shares.values()) >= 0 and shares[TRAINING] > 0
    assert 0 < cpu_per_second and seconds > 0
