"""Sweeps (fl_app/sweep.py): real `-m` sweeps, sequential (with a job its data cannot serve)
and in parallel, sweeps stopped by a bad value before any job runs, and the summary of
hand-written job directories (target not reached, no target, failed jobs)."""

import csv
import json
from datetime import datetime

import pytest

from conftest import SMALL_RUN, run_simulation_cli

from fl_app.sweep import summarise


def read_summary(sweep_dir):
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_plot(sweep_dir):
    assert (sweep_dir / "summary.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_sweep_summary_has_a_row_per_job_as_its_metrics_say_and_a_job_the_data_cannot_serve_fails_alone(tmp_path):
    # Job 0: no Dirichlet(0.0001) split gives all 20 clients 10 samples, known only once it
    # splits; job 1 trains, and reaches its target in round 1, which ends it.
    result = run_simulation_cli(
        "-m", *SMALL_RUN, "num_rounds=2", "target_accuracy=0.5", "partitioner=dirichlet",
        "partitioner.alpha=0.0001,100", f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode != 0  # the sweep reports its failed job
    assert "Invalid config key 'partitioner.alpha, partitioner.min_partition_size'" in result.stdout + result.stderr
    rows = read_summary(tmp_path)
    # Overrides shared by every job (SMALL_RUN, num_rounds, ...) do not label a job.
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("0", "partitioner.alpha=0.0001", "failed: no metrics.json"), ("1", "partitioner.alpha=100", "ok")
    ]
    row, history = rows[1], json.loads((tmp_path / "1" / "metrics.json").read_text())
    accuracies = [r["test_accuracy"] for r in history]
    assert float(row["final_accuracy"]) == accuracies[-1] > 0.5 and float(row["best_accuracy"]) == max(accuracies)
    assert (row["best_round"], row["rounds_to_target"], row["rounds_completed"], row["accuracy_of"]) == (
        "1", "1", "1", "test set")
    assert float(row["train_seconds"]) == round(sum(r["round_seconds"] for r in history), 1)
    markdown = (tmp_path / "summary.md").read_text()
    assert "| 1 | partitioner.alpha=100 | ok |" in markdown
    assert_plot(tmp_path)


@pytest.mark.slow
def test_parallel_sweep_with_joblib_runs_jobs_at_once_each_with_its_own_outputs(tmp_path):
    result = run_simulation_cli(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SMALL_RUN, "num_rounds=1",
        "seed=1,2", f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(tmp_path)
    assert [(r["overrides"], r["status"], r["rounds_completed"]) for r in rows] == [
        ("seed=1", "ok", "1"), ("seed=2", "ok", "1")
    ]
    assert all(float(r["final_accuracy"]) > 0.8 for r in rows)
    assert (tmp_path / "summary.md").read_text() in result.stdout  # logged when the sweep ends
    assert_plot(tmp_path)
    for job, seed in (("0", 1), ("1", 2)):
        assert f"seed: {seed}" in (tmp_path / job / "config.yaml").read_text()
        assert (tmp_path / job / "model.keras").is_file()

    # Each job ran in its own process with its own Ray, at the same time as the other.
    def span(job):
        stamps = [line[1:24] for line in (tmp_path / job / "run_simulation.log").read_text().splitlines()
                  if line.startswith("[20")]
        return datetime.fromisoformat(stamps[0]), datetime.fromisoformat(stamps[-1])

    (start0, end0), (start1, end1) = span("0"), span("1")
    assert start0 < end1 and start1 < end0


@pytest.mark.parametrize("swept, bad, key", [
    ("learning_rate=0.01,-1", "learning_rate=-1", "learning_rate"),
    # run_simulation.py runs simulations only: a deployment job is refused like a bad value.
    ("mode=simulation,deployment", "mode=deployment", "mode"),
])
def test_a_bad_value_in_any_job_stops_the_sweep_before_the_first_job_trains(tmp_path, swept, bad, key):
    result = run_simulation_cli("-m", *SMALL_RUN, "num_rounds=1", "seed=1,2", swept, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    output = result.stdout + result.stderr
    # Jobs 0..3 are (seed, swept) = (1, good), (1, bad), (2, good), (2, bad).
    assert "Sweep job 1 (" in output and bad in output and "No job has run" in output
    assert f"Invalid config key '{key}'" in output.split("No job has run")[0].split("):", 1)[1]
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("job.yaml"))


def write_job(sweep_dir, num, overrides, status, target=None, accuracies=None):
    """A job directory as a sweep leaves it; accuracies=None: the job wrote no metrics."""
    job_dir = sweep_dir / str(num)
    job_dir.mkdir()
    (job_dir / "job.yaml").write_text(json.dumps({"num": num, "overrides": overrides, "status": status}))
    if accuracies is None:
        return
    (job_dir / "config.yaml").write_text(f"num_rounds: 3\ntarget_accuracy: {json.dumps(target)}\n")
    history = [{"round": i, "round_seconds": 1.25} | ({} if acc is None else {"test_accuracy": acc})
               for i, acc in enumerate(accuracies, start=1)]
    (job_dir / "metrics.json").write_text(json.dumps(history))


def test_summary_of_reached_not_reached_no_target_and_failed_jobs(tmp_path):
    # Job 10 first: jobs are ordered by number, not by directory name.
    write_job(tmp_path, 10, ["num_rounds=3", "seed=10"], "COMPLETED", None, [0.5, 0.6, 0.7])
    write_job(tmp_path, 0, ["num_rounds=3", "seed=0"], "COMPLETED", 0.9, [0.85, 0.92])
    # Not evaluated in round 2; best in round 1.
    write_job(tmp_path, 1, ["num_rounds=3", "seed=1"], "COMPLETED", 0.99, [0.9, None, 0.88])
    write_job(tmp_path, 2, ["num_rounds=3", "seed=2"], "UNKNOWN")  # exited before round 1
    write_job(tmp_path, 3, ["num_rounds=3", "seed=3"], "FAILED", 0.99, [0.8])  # raised in round 2

    summarise(tmp_path)

    fields = ("job", "overrides", "status", "final_accuracy", "best_accuracy",
              "best_round", "rounds_to_target", "rounds_completed", "train_seconds")
    assert [tuple(row[f] for f in fields) for row in read_summary(tmp_path)] == [
        ("0", "seed=0", "ok", "0.92", "0.92", "2", "2", "2", "2.5"),
        ("1", "seed=1", "ok", "0.88", "0.9", "1", "not reached", "3", "3.8"),
        ("2", "seed=2", "failed: no metrics.json", "", "", "", "", "", ""),
        ("3", "seed=3", "failed", "0.8", "0.8", "1", "not reached", "1", "1.2"),
        ("10", "seed=10", "ok", "0.7", "0.7", "3", "", "3", "3.8"),
    ]
    markdown = (tmp_path / "summary.md").read_text().splitlines()
    assert markdown[0].startswith("| job | overrides | status |") and len(markdown) == 2 + 5
    assert markdown[3] == "| 1 | seed=1 | ok | 0.8800 | 0.9000 | test set | 1 | not reached | 3 | 3.8 | - |"
    assert markdown[4] == "| 2 | seed=2 | failed: no metrics.json | - | - | - | - | - | - | - | - |"
    assert markdown[6] == "| 10 | seed=10 | ok | 0.7000 | 0.7000 | test set | 3 | - | 3 | 3.8 | - |"
    assert_plot(tmp_path)
    assert not (tmp_path / "privacy.png").exists()  # no job ran with DP


def test_dp_jobs_get_their_epsilon_and_the_trade_off_plot(tmp_path):
    for num, (accuracy, epsilon) in enumerate([(0.9, 250.0), (0.6, 3.5)]):
        write_job(tmp_path, num, [f"privacy.noise_multiplier={num}"], "COMPLETED", None, [accuracy])
        history = json.loads((tmp_path / str(num) / "metrics.json").read_text())
        history[-1]["epsilon"] = epsilon
        (tmp_path / str(num) / "metrics.json").write_text(json.dumps(history))
    summarise(tmp_path)
    assert [(r["overrides"], r["final_epsilon"]) for r in read_summary(tmp_path)] == [
        ("privacy.noise_multiplier=0", "250.0"), ("privacy.noise_multiplier=1", "3.5")]
    assert (tmp_path / "summary.md").read_text().splitlines()[3].endswith("| 3.5 |")
    assert (tmp_path / "privacy.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_without_a_test_set_is_summarised_by_its_clients_accuracy(tmp_path):
    write_job(tmp_path, 0, ["dataset=image_folder"], "COMPLETED")
    history = [{"round": 1, "round_seconds": 1.0, "eval_accuracy": 0.6},
               {"round": 2, "round_seconds": 1.0, "eval_accuracy": 0.7}]
    (tmp_path / "0" / "metrics.json").write_text(json.dumps(history))
    summarise(tmp_path)
    (row,) = read_summary(tmp_path)
    assert (row["final_accuracy"], row["best_round"], row["accuracy_of"]) == ("0.7", "2", "clients")
