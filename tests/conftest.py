"""Shared test setup: real data from ../shared/datasets unless FL_APP_DATA_DIR says otherwise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from fl_app.local_federation import free_port  # noqa: F401 (fl_app's own, for the tests)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # console scripts (flwr, ray) of this Python environment
# Set here so every process the tests start (Ray workers, SuperLinks) inherits it.
os.environ.setdefault("FL_APP_DATA_DIR", str(REPO.parent / "shared" / "datasets"))
os.environ["FL_APP_DATA_DIR"] = str(Path(os.environ["FL_APP_DATA_DIR"]).resolve())

# A small federation that still learns: 4 of 20 clients (about 2,700 images each) per round.
SMALL_RUN = ["num_clients=20", "fraction_fit=0.2", "fraction_evaluate=0.1", "min_fit_clients=2"]


def run_simulation_cli(
    *overrides: str, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python run_simulation.py overrides...` as a user runs it, output captured."""
    return subprocess.run(
        [sys.executable, str(REPO / "run_simulation.py"), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["FL_APP_DATA_DIR"])
    assert (root / "mnist" / "train-images-idx3-ubyte.gz").exists(), (
        f"MNIST files not found under {root}; set FL_APP_DATA_DIR to the datasets folder"
    )
    return root


def read_history(run_dir: Path) -> list[dict]:
    """A run's metrics.json: one record per completed round."""
    return json.loads((run_dir / "metrics.json").read_text())


def fit_result(proxy, arrays, num_examples, **metrics):
    """A client's successful fit reply, as a strategy receives it."""
    return proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, metrics)


CLIENT_FAULT_RUN = '''
import sys

import numpy as np
from flwr.app import ArrayRecord

from fl_app.config import compose_config
from fl_app.simulation import simulate

partitions, fault = {int(p) for p in sys.argv[1].split(",")}, sys.argv[2]


def fault_mod(message, context, call_next):
    """The clients of `partitions` fail: "nan" replies NaN weights; any other fault names the
    stage at which they raise: "train" (plain training) or a SecAgg+ stage."""
    if context.node_config["partition-id"] not in partitions or message.metadata.message_type != "train":
        return call_next(message, context)
    if fault == "nan":
        reply = call_next(message, context)
        for key, record in list(reply.content.array_records.items()):
            reply.content.array_records[key] = ArrayRecord([np.full_like(a, np.nan) for a in record.to_numpy_ndarrays()])
        return reply
    if message.content.config_records.get("secaggplus_configs", {}).get("stage", "train") == fault:
        raise RuntimeError(f"partition {context.node_config['partition-id']} failed at {fault}")
    return call_next(message, context)


simulate(compose_config(sys.argv[3:]), client_mods=(fault_mod,))
'''


def run_with_client_fault(tmp_path: Path, partitions: list[int], fault: str,
                          *overrides: str) -> subprocess.CompletedProcess:
    """A simulation on fl_app's engine (`simulate`, as run_simulation.py runs it) in which the
    clients of `partitions` fail as `fault` says (CLIENT_FAULT_RUN); its output captured."""
    script = tmp_path / "client_fault_run.py"
    script.write_text(CLIENT_FAULT_RUN)
    result = subprocess.run([sys.executable, str(script), ",".join(map(str, partitions)), fault, *overrides],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def write_image_folder(root: Path, images, labels, size: tuple[int, int] | None = None,
                       mode: str = "L", suffix: str = ".png", names: tuple[str, ...] | None = None) -> Path:
    """Write uint8 (N, H, W, 1) images as files root/<name>/<i><suffix>, one folder per
    class (label i is names[i], by default "0".."9"; empty folders too), optionally resized
    and converted (e.g. "RGB")."""
    from PIL import Image

    names = names or tuple(str(label) for label in range(10))
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        picture = Image.fromarray(image[..., 0], "L").convert(mode)
        if size:
            picture = picture.resize(size)
        picture.save(root / names[int(label)] / f"{i:06d}{suffix}")  # sorted = written order
    return root


# A task of our own: five Fashion-MNIST classes under new names.
OWN_CLASSES = ("boot", "coat", "dress", "shirt", "trouser")  # sorted, as read from folders
OWN_TASK_OF_FASHION = {9: 0, 4: 1, 3: 2, 6: 3, 1: 4}  # Fashion-MNIST label -> our label
# Each party as it might be: its own image size, colour mode and file type, its own number of
# images; the third holds no "dress".
OWN_PARTIES = {
    "hospital_a": dict(size=(64, 64), mode="RGB", suffix=".png", count=500),
    "hospital_b": dict(size=(40, 36), mode="L", suffix=".jpg", count=350),
    "lab_c": dict(size=None, mode="RGB", suffix=".jpg", count=250, without="dress"),
}


def own_task_images(data_root: Path, count: int, start: int, split: str = "train"):
    """`count` Fashion-MNIST images of the five classes from row `start` on, relabelled."""
    import numpy as np

    from fl_app.data import load_dataset

    x_train, y_train, x_test, y_test = load_dataset("fashion_mnist", data_root)
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    rows = np.flatnonzero(np.isin(y, list(OWN_TASK_OF_FASHION)))[start:start + count]
    return x[rows], np.array([OWN_TASK_OF_FASHION[int(label)] for label in y[rows]])


def write_own_task(root: Path, data_root: Path, test_images: int = 0) -> Path:
    """root/clients/<party>/<class>/ as OWN_PARTIES says, and with `test_images` a test set
    in root/test/; returns root."""
    start = 0
    for party, spec in OWN_PARTIES.items():
        x, y = own_task_images(data_root, spec["count"], start)
        start += spec["count"]
        if "without" in spec:
            keep = y != OWN_CLASSES.index(spec["without"])
            x, y = x[keep], y[keep]
        write_image_folder(root / "clients" / party, x, y, spec["size"], spec["mode"], spec["suffix"],
                           names=OWN_CLASSES)
        if "without" in spec:
            (root / "clients" / party / spec["without"]).rmdir()
    if test_images:
        write_image_folder(root / "test", *own_task_images(data_root, test_images, 0, "test"), names=OWN_CLASSES)
    return root


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """A run's TensorBoard scalars, tag -> [(step, value), ...] in written order, read with
    TensorBoard's own reader (as `tensorboard --logdir` would show them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})  # 0: keep all
    events.Reload()
    return {
        tag: [(event.step, float(make_ndarray(event.tensor_proto))) for event in events.Tensors(tag)]
        for tag in events.PluginTagToContent("scalars")
    }


def mnist_task(data_root: Path):
    """The built-in MNIST task, its files in `data_root`."""
    from fl_app.config_schema import DatasetConfig
    from fl_app.task import task_of

    return task_of(DatasetConfig("mnist", str(data_root), val_fraction=0.1))


def predict(capsys, *args) -> tuple[int, str, str]:
    """fl_app.predict as its command line runs it: (exit code, stdout, stderr)."""
    from fl_app.predict import main

    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err
