"""The same simulation on a Ray cluster: a Ray head started on 127.0.0.1 by the test."""

import json
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import BIN, SMALL_RUN, free_port, run_simulation_cli

RAY_SESSION = Path(tempfile.gettempdir()) / "ray" / "session_latest"


@pytest.fixture
def ray_head():
    port = free_port()
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=120,
    )
    assert start.returncode == 0, f"Ray could not start a head node: {start.stderr[-500:]}"
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)


def worker_logs(session: Path) -> set[Path]:
    return set((session / "logs").glob("python-core-worker-*.log"))


@pytest.mark.slow
def test_simulation_joins_a_running_ray_cluster(tmp_path, ray_head):
    session = RAY_SESSION.resolve()  # the head's session: a private Ray would start its own
    before = worker_logs(session)
    run_dir = tmp_path / "run"
    result = run_simulation_cli(*SMALL_RUN, "num_rounds=2", f"mode.ray_address={ray_head}",
                                f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert RAY_SESSION.resolve() == session
    assert len(worker_logs(session) - before) >= 2, "no client workers ran on the cluster"
    history = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in history] == [1, 2] and history[-1]["test_accuracy"] > 0.85


def test_a_ray_address_where_no_head_answers_stops_the_run_naming_the_key(tmp_path):
    # Ray alone retries such an address for minutes.
    address = f"127.0.0.1:{free_port()}"
    result = run_simulation_cli("num_rounds=1", "num_clients=2", f"mode.ray_address={address}",
                                f"output_dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    assert f"Invalid config key 'mode.ray_address': got '{address}', but no Ray head answers there" in (
        result.stdout + result.stderr)
    assert not (tmp_path / "metrics.json").exists()
