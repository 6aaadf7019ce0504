"""`flwr run .` end to end: Flower's CLI starts its own local SuperLink on free ports."""

import contextlib
import json
import os
import subprocess

import psutil
import pytest
from conftest import BIN, REPO, free_port, run_simulation_cli
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.rdp import RdpAccountant

pytestmark = pytest.mark.slow  # every test starts Flower's CLI, a SuperLink and a federation


def stop_processes_under(flwr_home) -> None:
    """Kill the SuperLink that `flwr run` left running for this FLWR_HOME, and its children."""
    for proc in psutil.process_iter(["cmdline"]):
        if str(flwr_home) in " ".join(proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                family = [proc, *proc.children(recursive=True)]
                for member in family:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        member.kill()
                psutil.wait_procs(family, timeout=30)


@pytest.fixture
def flwr_env(tmp_path):
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        # `flwr` and the `flower-superlink` it starts: those of this Python environment.
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "FLWR_HOME": str(home),  # never the user's ~/.flwr
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        # Use the installed packages instead of building a fresh environment per run.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    yield env
    stop_processes_under(home)


def flwr_run(flwr_env, overrides, supernodes):
    return subprocess.run(
        [str(BIN / "flwr"), "run", ".", "--stream", "--run-config", f'overrides="{overrides}"',
         "--federation-config", f"num-supernodes={supernodes} client-resources-num-cpus=1"],
        cwd=REPO, env=flwr_env, capture_output=True, text=True, timeout=600,
    )


def test_flwr_run_trains_and_matches_run_simulation_bit_for_bit(tmp_path, flwr_env):
    # Also the test of reproducibility: two runs, separate processes, the same seed.
    out = tmp_path / "run"
    # Each client trains on 4,000 images (80 % of its third held out, unused): quick, still learns.
    overrides = f"num_rounds=2 fraction_evaluate=0 seed=3 dataset.val_fraction=0.8 output_dir={out}"
    result = flwr_run(flwr_env, overrides, supernodes=3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # num_clients left at its default (10) follows the federation, without a warning.
    assert "num_clients follows the federation: 3 SuperNodes" in result.stdout
    assert "was given, but the federation has" not in result.stdout
    # The stream shows fl_app's lines; Flower's own are in the run's server.log.
    assert "[round 2/2] clients 3/3 trained" in result.stdout and "configure_fit" not in result.stdout
    server_log = (out / "server.log").read_text()
    assert "configure_fit: strategy sampled 3 clients" in server_log and "[round 2/2]" in server_log
    history = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in history] == [1, 2]
    assert history[-1]["clients_succeeded"] == 3
    assert history[-1]["test_accuracy"] > 0.9
    assert (out / "model.keras").exists() and (out / "metrics.png").exists()
    for picture in ("confusion_matrix.png", "predictions.png", "model_summary.txt"):
        assert (out / picture).stat().st_size > 1000, picture
    assert "num_clients: 3" in (out / "config.yaml").read_text()

    # The other door, same overrides: the same composed config and the same rounds, bit for
    # bit (every client trains each round, so which virtual node is sampled cannot differ).
    other = tmp_path / "run_simulation"
    result = run_simulation_cli("num_clients=3", *overrides.split()[:-1], f"output_dir={other}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (other / "config.yaml").read_text().replace(str(other), str(out)) == (
        out / "config.yaml"
    ).read_text()
    keys = ("test_loss", "test_accuracy", "train_loss")
    via_cli = [[r[k] for k in keys] for r in json.loads((other / "metrics.json").read_text())]
    assert via_cli == [[r[k] for k in keys] for r in history]


def test_central_dp_under_flwr_run_accounts_for_the_federation_that_ran(tmp_path, flwr_env):
    """3 SuperNodes, num_clients given as 10: the federation's size replaces it, with a
    warning, and each record says what happened."""
    out = tmp_path / "run"
    overrides = ("num_clients=10 num_rounds=1 fraction_evaluate=0 dataset.val_fraction=0.8 privacy=central_dp "
                 f"privacy.noise_multiplier=1.0 output_dir={out}")
    result = flwr_run(flwr_env, overrides, supernodes=3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (record,) = json.loads((out / "metrics.json").read_text())
    assert (record["dp_clients_sampled"], record["dp_clients_aggregated"], record["dp_population"]) == (3, 3, 3)
    assert record["dp_noise_std"] == pytest.approx(1.0 * 1.0 / 3)
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_event.SampledWithoutReplacementDpEvent(3, 3, dp_event.GaussianDpEvent(0.5)))
    assert record["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert "num_clients: 3" in (out / "config.yaml").read_text()
    assert "num_clients=10 was given, but the federation has 3 SuperNodes" in result.stdout, result.stdout[-3000:]
