"""A task of the user's own (dataset=image_folder): its config, its folders, every bad input,
and the per-class and per-party figures that every run reports."""

import csv
import json
import re
import shutil

import numpy as np
import pytest
from conftest import OWN_CLASSES, OWN_PARTIES, predict, read_history, run_simulation_cli, write_own_task
from flwr.common import Code, EvaluateRes, Status
from flwr.server.compat.grid_client_proxy import GridClientProxy
from omegaconf import OmegaConf

from fl_app import model as keras_model
from fl_app.config import compose_config
from fl_app.config_schema import ConfigError
from fl_app.data import DatasetError
from fl_app.outputs import RunOutputs
from fl_app.partition import label_counts, load_client_data
from fl_app.strategy import build_strategy
from fl_app.simulation import simulate
from fl_app.task import central_test_set, task_of

OWN = ["dataset=image_folder", "dataset.image_size=[32,32]", "dataset.channels=1"]


@pytest.fixture(scope="module")
def own_task(tmp_path_factory, data_root):
    return write_own_task(tmp_path_factory.mktemp("own"), data_root, test_images=200)


def own_config(root, *overrides):
    return compose_config([*OWN, f"dataset.clients_dir={root / 'clients'}", *overrides])


def test_classes_and_clients_are_read_from_the_party_folders(own_task):
    cfg = own_config(own_task)
    assert cfg.dataset.classes == list(OWN_CLASSES)  # sorted, from every party's folders
    assert cfg.num_clients == len(OWN_PARTIES)
    task = task_of(cfg.dataset)
    assert task.parties == sorted(OWN_PARTIES) and task.image_shape == (32, 32, 1)
    # Given classes fix the label order, whatever the folders' order.
    given = own_config(own_task, "dataset.classes=[trouser,shirt,dress,coat,boot]")
    assert given.dataset.classes[0] == "trouser"


def test_each_party_is_its_own_folder_in_any_size_and_mode(own_task):
    task = task_of(own_config(own_task, "dataset.val_fraction=0.2").dataset)
    counts = label_counts(task, "iid", 3, 0)
    assert counts.shape == (3, 5) and counts.sum(axis=1).tolist() == [500, 350, 198]
    assert counts[2, OWN_CLASSES.index("dress")] == 0  # lab_c holds no dress
    for party, size in enumerate(counts.sum(axis=1)):
        data = load_client_data(task, "iid", party, 3, 0.2, seed=0)
        assert data.x_train.shape[1:] == (32, 32, 1)
        assert len(data.y_val) == round(size * 0.2) and len(data.y_train) == size - len(data.y_val)
        np.testing.assert_array_equal(np.bincount(np.concatenate([data.y_train, data.y_val]), minlength=5),
                                      counts[party])


def test_the_pooled_folder_is_split_by_the_partitioner_and_the_test_set_read(own_task):
    cfg = compose_config([*OWN, f"dataset.train_dir={own_task / 'clients' / 'hospital_a'}",
                          f"dataset.test_dir={own_task / 'test'}", "num_clients=4",
                          "partitioner=dirichlet", "partitioner.alpha=0.3", "partitioner.min_partition_size=20"])
    task = task_of(cfg.dataset)
    counts = label_counts(task, "dirichlet", 4, cfg.seed, alpha=0.3, min_partition_size=20)
    assert counts.sum() == 500 and counts.min(initial=0) >= 0 and cfg.num_clients == 4
    x_test, y_test = central_test_set(task)
    assert x_test.shape == (200, 32, 32, 1) and set(y_test) <= set(range(5))


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["dataset.classes=[a,b,a]"], "dataset.classes", "names a more than once"),
        (["dataset.classes=[a,'']"], "dataset.classes", "must not be empty"),
        (["dataset.classes=[a]"], "dataset.classes", "at least 2 classes"),
        (["dataset.image_size=[0,32]"], "dataset.image_size", "[height, width]"),
        (["dataset.image_size=[32]"], "dataset.image_size", "[height, width]"),
        (["dataset.channels=4"], "dataset.channels", "1 (grey) or 3 (RGB)"),
        (["dataset.train_dir=x"], "dataset.clients_dir / dataset.train_dir", "got both"),
        (["dataset.clients_dir=null"], "dataset.clients_dir / dataset.train_dir", "got neither"),
        (["num_clients=5"], "num_clients", "holds 3 party folders"),
        (["dataset.val_fraction=0.999"], "dataset.val_fraction", "too few for a training and a held-out part"),
        (["mode=deployment"], "dataset.clients_dir", "applies to mode simulation only"),
        (["dataset.classes=[boot,coat]"], None, "unknown class folder(s) dress, shirt, trouser"),
    ],
)
def test_bad_task_settings_are_refused_before_training(own_task, overrides, key, fragment):
    error = ConfigError if key else DatasetError
    with pytest.raises(error, match=re.escape(fragment)) as err:
        own_config(own_task, *overrides)
    if key:
        assert err.value.key == key


def test_deployment_needs_the_class_names_and_built_in_datasets_take_no_task_settings():
    with pytest.raises(ConfigError, match="must list the class names in deployment") as err:
        compose_config([*OWN, "mode=deployment"])
    assert err.value.key == "dataset.classes"
    cfg = compose_config([*OWN, "mode=deployment", "dataset.classes=[benign,malignant]"])
    assert task_of(cfg.dataset).classes == ("benign", "malignant")
    with pytest.raises(ConfigError, match="does not apply to dataset mnist") as err:
        compose_config(["+dataset.image_size=[32,32]"])
    assert err.value.key == "dataset.image_size"


def test_folders_that_cannot_serve_the_task_say_which(tmp_path, data_root):
    root = write_own_task(tmp_path, data_root)
    (root / "clients" / "lab_c" / "cat").mkdir()
    (root / "clients" / "lab_c" / "cat" / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=re.escape(f"{root / 'clients' / 'lab_c'}: unknown class folder(s) cat")):
        own_config(root, "dataset.classes=[boot,coat,dress,shirt,trouser]")
    shutil.rmtree(root / "clients" / "lab_c" / "cat")

    # An unreadable image stops a simulation before its engine starts, naming the file.
    torn = root / "clients" / "hospital_b" / "coat" / "torn.jpg"
    torn.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DatasetError, match=re.escape(f"{torn}: cannot be read as an image")):
        simulate(own_config(root, f"output_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run").exists()
    torn.unlink()

    (root / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="test: unknown class folder"):
        central_test_set(task_of(own_config(root, f"dataset.test_dir={root / 'test'}").dataset))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no party folder"):
        compose_config([*OWN, f"dataset.clients_dir={empty}"])


def test_class_scores_are_precision_recall_and_f1_per_class():
    confusion = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])  # class 2: no image, never predicted
    scores = keras_model.class_scores(confusion)
    np.testing.assert_allclose(scores.precision, [8 / 9, 3 / 5, 0])
    np.testing.assert_allclose(scores.recall, [8 / 10, 3 / 4, 0])
    f1 = [2 * (8 / 9) * 0.8 / (8 / 9 + 0.8), 2 * 0.6 * 0.75 / 1.35]
    np.testing.assert_allclose(scores.f1, [*f1, 0])
    assert scores.support.tolist() == [10, 4, 0] and scores.macro_f1 == pytest.approx(np.mean(f1))
    counts = keras_model.confusion_counts(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def evaluate_result(node_id, name, loss, confusion):
    matrix = np.asarray(confusion, "<i8")
    metrics = {"accuracy": np.trace(matrix) / matrix.sum(), "client": name, "train_examples": 40,
               "confusion_matrix": matrix.tobytes()}
    proxy = GridClientProxy(node_id=node_id, grid=None, run_id=0)
    return proxy, EvaluateRes(Status(Code.OK, ""), loss, int(matrix.sum()), metrics)


def test_the_server_sums_the_clients_confusion_counts_and_lists_each_party():
    strategy = build_strategy("fedavg", {}, [np.zeros(2, np.float32)])
    strategy.rounds[1] = {"round": 1}  # as configure_fit leaves it
    results = [evaluate_result(7, "site_b", 0.5, [[3, 1], [0, 4]]),
               evaluate_result(3, "site_a", 0.2, [[5, 0], [2, 1]])]
    loss, metrics = strategy.aggregate_evaluate(1, results, [])
    assert strategy.confusion[1].tolist() == [[8, 1], [2, 5]]
    assert [row["client"] for row in strategy.parties[1]] == ["site_a", "site_b"]
    assert strategy.parties[1][0] | {"eval_accuracy": 0} == {
        "client": "site_a", "train_examples": 40, "eval_examples": 8, "eval_loss": 0.2, "eval_accuracy": 0}
    # Counts and names are not averaged as if they were measurements.
    assert set(metrics) == {"accuracy"} and loss == pytest.approx((0.5 * 8 + 0.2 * 8) / 16)


def test_a_resumed_round_replaces_its_rows_in_the_per_round_tables(tmp_path):
    columns = ("round", "client", "eval_accuracy")
    crashed = RunOutputs(tmp_path)
    for server_round in (1, 2, 3):
        crashed.write_round_rows(crashed.clients_csv, columns, server_round, [{"client": "a", "eval_accuracy": 0.5}])
    with open(crashed.clients_csv, "a") as f:
        f.write("1")  # a row cut short by a crash, here within its round number
    # The run stopped after writing round 3 but before its checkpoint: resumed, round 3 again.
    resumed = RunOutputs(tmp_path)
    for server_round in (3, 4):
        resumed.write_round_rows(resumed.clients_csv, columns, server_round, [{"client": "a", "eval_accuracy": 0.9}])
    lines = resumed.clients_csv.read_text().splitlines()
    assert lines == ["round,client,eval_accuracy", "1,a,0.5", "2,a,0.5", "3,a,0.9", "4,a,0.9"]


def test_predict_names_the_tasks_own_classes_and_measures_its_test_dir(tmp_path, capsys, own_task):
    cfg = own_config(own_task, f"dataset.test_dir={own_task / 'test'}")
    task = task_of(cfg.dataset)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))  # as a run writes it
    model = keras_model.build_model("mcmahan_2nn", task.image_shape, len(task.classes), "adam",
                                    "sparse_categorical_crossentropy", 0.002)
    model.save(run / "model.keras")

    assert predict(capsys, run / "model.keras", own_task / "clients" / "lab_c" / "coat",
                   "-o", tmp_path / "out.csv")[0] == 0
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50 and {row["predicted"] for row in rows} <= set(OWN_CLASSES)
    assert all(name in OWN_CLASSES for row in rows for name in re.findall(r"(\w+):", row["top3"]))

    code, out, _ = predict(capsys, run / "model.keras", "--split", "test")
    assert code == 0 and re.search(r"accuracy [\d.]+ on the 200 test images of image_folder", out)
    code, _, err = predict(capsys, run / "model.keras", "--split", "train")
    assert code == 1 and "its parties' folders (dataset.clients_dir)" in err

    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(own_config(own_task))))
    code, _, err = predict(capsys, run / "model.keras", "--split", "test")
    assert code == 1 and "has no test set" in err



@pytest.mark.slow
def test_three_parties_without_a_test_set_train_and_report_per_class_and_per_party(tmp_path, own_task):
    run = tmp_path / "run"
    result = run_simulation_cli(*OWN, f"dataset.clients_dir={own_task / 'clients'}", "num_rounds=5",
                                "target_accuracy=0.8", "local_epochs=2", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    history = read_history(run)
    # The clients' held-out images measure the run: the progress line, the target, the summary.
    assert all("test_accuracy" not in r and "eval_macro_f1" in r for r in history)
    reached = next(r["round"] for r in history if r["eval_accuracy"] >= 0.8)
    assert len(history) == reached and history[-1]["eval_accuracy"] > history[0]["train_accuracy"] - 0.2
    log = (run / "run_simulation.log").read_text()
    assert "No test set: the clients' held-out images measure the run" in log
    assert "[round 1/5] clients 3/3 trained (0 failed)" in log and "eval loss" in log
    assert f"Final federated (clients' held-out) accuracy {history[-1]['eval_accuracy']:.4f}" in log

    config = OmegaConf.load(run / "config.yaml")
    assert list(config.dataset.classes) == list(OWN_CLASSES) and config.num_clients == 3
    with open(run / "clients.csv") as f:
        parties = list(csv.DictReader(f))
    assert [row["client"] for row in parties if row["round"] == "1"] == sorted(OWN_PARTIES)
    assert (run / "clients.png").exists()
    assert [row["train_examples"] for row in parties][:3] == ["400", "280", "158"]
    with open(run / "per_class.csv") as f:
        per_class = [row for row in csv.DictReader(f) if int(row["round"]) == len(history)]
    assert [row["class"] for row in per_class] == list(OWN_CLASSES)
    # Summed over the parties: every held-out image once, as the clients' table counts them.
    assert sum(int(row["support"]) for row in per_class) == sum(
        int(row["eval_examples"]) for row in parties if int(row["round"]) == len(history))
    f1 = [float(row["f1"]) for row in per_class]
    assert history[-1]["eval_macro_f1"] == pytest.approx(np.mean(f1), abs=1e-5)
    assert (run / "confusion_matrix.png").exists() and not (run / "predictions.png").exists()


@pytest.mark.slow
def test_a_pooled_folder_split_non_iid_with_a_test_set(tmp_path, capsys, own_task):
    run = tmp_path / "run"
    result = run_simulation_cli(*OWN, f"dataset.train_dir={own_task / 'clients' / 'hospital_a'}",
                                f"dataset.test_dir={own_task / 'test'}", "num_clients=4", "num_rounds=2",
                                "partitioner=dirichlet", "partitioner.alpha=0.5", "partitioner.min_partition_size=20",
                                "dataset.channels=3", f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    history = read_history(run)
    assert all("test_accuracy" in r and "eval_macro_f1" in r for r in history)
    counts = np.array(json.loads((run / "partitions.json").read_text())["label_counts"])
    assert counts.shape == (4, 5) and counts.sum() == 500
    assert (run / "predictions.png").exists()
    code, out, _ = predict(capsys, run / "model.keras", "--split", "test")
    assert code == 0 and f"accuracy {history[-1]['test_accuracy']:.4f} on the 200 test images" in out
