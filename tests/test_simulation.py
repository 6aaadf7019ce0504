"""End to end on Flower's real simulation engine, through `run_simulation.py` as users run it."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import REPO, SMALL_RUN, mnist_task, read_history, read_scalars, run_simulation_cli, run_with_client_fault
from PIL import Image

from fl_app.task import central_test_set

OUTPUT_FILES = {"config.yaml", "metrics.json", "metrics.csv", "metrics.png", "model.keras",
                "checkpoint.npz", "partitions.json", "partitions.png", "model_summary.txt",
                "confusion_matrix.png", "predictions.png"}


def test_small_federation_learns_and_writes_every_output(tmp_path, data_root):
    run_dir = tmp_path / "run"
    result = run_simulation_cli(*SMALL_RUN, "num_rounds=3", "eval_every=2", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert OUTPUT_FILES <= {p.name for p in run_dir.iterdir()}

    history = read_history(run_dir)
    assert [r["round"] for r in history] == [1, 2, 3]
    # eval_every=2: the server and the clients evaluate rounds 2 and 3 (the last) only.
    assert ["test_accuracy" in r for r in history] == [False, True, True]
    assert ["eval_accuracy" in r for r in history] == [False, True, True]
    last = history[-1]
    assert last["clients_sampled"] == 4 and last["clients_succeeded"] == 4
    assert last["clients_failed"] == 0 and last["status"] == "ok"
    assert last["test_accuracy"] > 0.85, last
    for key in ("test_loss", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy",
                "round_seconds"):
        assert key in last, key
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("round,test_loss,test_accuracy") and len(csv_lines) == 4

    log = (run_dir / "run_simulation.log").read_text()
    start = re.search(r"Global model at the start \(round 0\): test loss [\d.]+ acc ([\d.]+)", log)
    assert start and float(start[1]) < 0.5, "the untrained model's test accuracy is not logged"
    assert "[round 1/3] clients 4/4 trained" in log and "test loss - acc -" in log
    assert f"Final test accuracy {last['test_accuracy']:.4f}" in log

    # The saved model is the final global model: same accuracy on the test set.
    model = keras.models.load_model(run_dir / "model.keras")
    x_test, y_test = central_test_set(mnist_task(data_root))
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    assert accuracy == pytest.approx(last["test_accuracy"], abs=1e-4)

    # TensorBoard: every numeric value of each round's record, once, at step = round.
    scalars = read_scalars(run_dir)
    numeric = {k for r in history for k, v in r.items() if k != "round" and not isinstance(v, str)}
    assert {"test_accuracy", "eval_loss", "clients_failed", "round_seconds"} <= numeric
    assert set(scalars) == numeric
    for key in numeric:
        assert scalars[key] == [(r["round"], pytest.approx(r[key])) for r in history if key in r], key

    # Pictures of the final model, sized as drawn (figsize x 100 dpi); mistakes framed in red.
    assert Image.open(run_dir / "confusion_matrix.png").size == (700, 600)
    grid = np.asarray(Image.open(run_dir / "predictions.png").convert("RGB"))
    assert grid.shape == (720, 1200, 3)
    assert np.all(grid == (255, 0, 0), axis=-1).sum() > 500
    summary = (run_dir / "model_summary.txt").read_text()
    assert "(Dense)" in summary and "(None, 128)" in summary and "Total params: 693,962" in summary
    assert summary.strip() in log

    # The console: a header, the starting model, a line per round with the time left, the
    # result; Flower's own lines, TensorFlow's start-up and the model's layers in the log only.
    console = (result.stdout + result.stderr).splitlines()
    assert len(console) == 2 + 1 + 3 + 1, console
    assert ("seed_cnn (693,962 parameters; 2.8 MB to and from each client a round) on mnist "
            "(28x28x1, 10 classes)") in console[0]
    assert "fedavg, 4 of 20 clients a round, 3 rounds | privacy: none" in console[0]
    assert all(re.search(r"\[round \d/3\] .* elapsed, ~\d+:\d\d left$", line) for line in console[3:6]), console
    assert "configure_fit" in log and "TensorFlow's start-up" in log


@pytest.mark.slow
def test_non_iid_run_with_another_strategy_stops_at_target_accuracy(tmp_path):
    run_dir = tmp_path / "run"
    result = run_simulation_cli(
        "num_clients=5", "fraction_evaluate=0", "num_rounds=6",
        "partitioner=pathological", "strategy=fedavgm", "strategy.server_learning_rate=1.0",
        "strategy.server_momentum=0.5",
        "model=mcmahan_2nn", "target_accuracy=0.6", f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = read_history(run_dir)
    assert history[-1]["test_accuracy"] >= 0.6
    assert all(r["test_accuracy"] < 0.6 for r in history[:-1]) and len(history) < 6
    assert f"Target accuracy 0.6 reached in round {len(history)}" in (run_dir / "run_simulation.log").read_text()
    partitions = json.loads((run_dir / "partitions.json").read_text())
    assert partitions["summary"]["clients"] == 5 and partitions["summary"]["size_min"] == 12_000
    assert partitions["summary"]["labels_per_client_max"] <= 4
    assert (run_dir / "partitions.png").stat().st_size > 10_000
    assert keras.models.load_model(run_dir / "model.keras").count_params() == 199_210


def wait_for_a_completed_round(proc: subprocess.Popen, out) -> None:
    deadline = time.monotonic() + 300
    while not ((out / "metrics.json").exists() and read_history(out)):
        assert proc.poll() is None, "run ended before its first round"
        assert time.monotonic() < deadline, "no round completed in time"
        time.sleep(0.5)


@pytest.mark.slow
def test_killed_run_resumes_from_last_completed_round_as_if_never_killed(tmp_path):
    out = tmp_path / "run"
    overrides = [*SMALL_RUN, "num_rounds=3", f"output_dir={out}", f"hydra.run.dir={tmp_path / 'h1'}"]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_simulation.py"), *overrides],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_a_completed_round(proc, out)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray workers it started
        proc.wait()
    before = read_history(out)
    assert 1 <= len(before) < 3

    result = run_simulation_cli(*overrides[:-1], f"hydra.run.dir={tmp_path / 'h2'}", "resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    after = read_history(out)
    assert [r["round"] for r in after] == [1, 2, 3]
    assert after[: len(before)] == before
    resumed_log = (tmp_path / "h2" / "run_simulation.log").read_text()
    assert f"Resuming {out} after round {len(before)}" in resumed_log
    # It starts from the checkpoint's global model: the same test results as that round's.
    assert (f"Global model at the start (round {len(before)}): test loss {before[-1]['test_loss']:.4f} "
            f"acc {before[-1]['test_accuracy']:.4f}") in resumed_log

    # The same seed without the crash: the same clients sampled (a fifth of them each round)
    # and the same results, bit for bit.
    whole = tmp_path / "uninterrupted"
    result = run_simulation_cli(*overrides[:-2], f"output_dir={whole}", f"hydra.run.dir={tmp_path / 'h3'}")
    assert result.returncode == 0, result.stderr[-3000:]

    def results(history):
        return [{k: v for k, v in r.items() if k != "round_seconds"} for r in history]

    assert results(read_history(whole)) == results(after)


@pytest.mark.slow
def test_ctrl_c_stops_the_run_within_seconds(tmp_path):
    # Flower's ServerApp thread used to go on waiting for replies after Ctrl-C stopped its engine.
    out, log = tmp_path / "run", tmp_path / "output.txt"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_simulation.py"), *SMALL_RUN, "num_rounds=100", f"output_dir={out}"],
        cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        # A shell running the tests in the background may ignore SIGINT; a user's terminal does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for_a_completed_round(proc, out)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to a terminal's foreground group
        assert proc.wait(timeout=60) == 130
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already, Ray's workers too
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert f"Interrupted. The rounds completed so far are saved in {out}" in log.read_text()
    assert 1 <= len(read_history(out)) < 100


@pytest.mark.slow
def test_corrupt_data_file_stops_the_run_naming_the_file(tmp_path, data_root):
    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    for name in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (data / name).write_bytes((data_root / "mnist" / name).read_bytes())
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    run_dir = tmp_path / "run"
    result = run_simulation_cli(
        "num_rounds=1", f"hydra.run.dir={run_dir}", env={"FL_APP_DATA_DIR": str(tmp_path / "data")}
    )
    assert result.returncode != 0
    assert f"{data / 'train-images-idx3-ubyte.gz'}: not a valid gzip file" in result.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == ["run_simulation.log"]


@pytest.mark.slow
def test_a_gpu_share_no_ray_node_has_stops_the_run_naming_the_keys(tmp_path):
    # No node holds 1,000 GPUs, so Flower's engine cannot host one client and stops; its
    # ServerApp thread, waiting for replies, used to keep the process alive for ever.
    result = run_simulation_cli("num_rounds=1", "num_clients=2", "mode.num_gpus_per_client=1000",
                                f"output_dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    assert ("Invalid config key 'mode.num_cpus_per_client / mode.num_gpus_per_client': got 1 / 1000.0"
            in result.stdout + result.stderr)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_round_timeout_counts_late_clients_as_failed_and_keeps_the_model(tmp_path):
    run_dir = tmp_path / "run"
    # verbose=true: Flower's own lines on the console too. The late clients still train (3,000
    # images each, the rest held out and unused) before the engine shuts down.
    result = run_simulation_cli("num_clients=2", "fraction_evaluate=0", "num_rounds=1", "verbose=true",
                                "dataset.val_fraction=0.9", "round_timeout=0.001", f"hydra.run.dir={run_dir}")
    # Its only round failed: the run failed, and says why last.
    assert result.returncode == 1, result.stderr[-3000:]
    (record,) = read_history(run_dir)
    assert (record["clients_sampled"], record["clients_succeeded"], record["clients_failed"]) == (2, 0, 2)
    assert record["status"] == "failed"
    assert "2 client(s) did not reply within round_timeout" in (run_dir / "run_simulation.log").read_text()
    console = result.stdout + result.stderr
    assert "configure_fit: strategy sampled 2 clients" in console and "Total params: 693,962" in console
    # The driver's last line (verbose=true interleaves the workers' lines on the console).
    assert (run_dir / "run_simulation.log").read_text().strip().splitlines()[-1].endswith(
        "Run failed: none of its 1 round(s) aggregated an update, so the model is the one it started from. "
        "Round 1: 0 valid update(s), min_fit_clients=2; 2 client(s) did not reply within round_timeout")
    assert (run_dir / "model.keras").exists()  # the outputs are written all the same


@pytest.mark.slow
def test_a_client_sending_nan_updates_is_rejected_every_round(tmp_path):
    # Partition 1 of 2 replies NaN weights, as a faulty or malicious party would.
    out = tmp_path / "run"
    result = run_with_client_fault(tmp_path, [1], "nan", "num_clients=2", "min_fit_clients=1", "num_rounds=2",
                          "fraction_evaluate=0", "dataset.val_fraction=0.8", f"output_dir={out}")
    history = read_history(out)
    for record in history:
        assert (record["clients_succeeded"], record["clients_failed"], record["status"]) == (1, 1, "ok"), record
    assert history[-1]["test_accuracy"] > 0.8  # the global model was never poisoned
    log = result.stdout + result.stderr
    assert "rejected update" in log and "NaN or Inf" in log
