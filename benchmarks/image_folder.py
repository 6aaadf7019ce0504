"""Loading an image folder, and the round time of a 64x64 RGB folder task beside MNIST's.

    FL_APP_DATA_DIR=../shared/datasets python -m benchmarks.image_folder [--images 10000] [--rounds 4]

Writes the first N Fashion-MNIST training images as 64x64 RGB PNGs into class folders in a
temporary directory, then measures in images/s (median of 3, files in the page cache):
listing them (`list_images`), decoding them (`check_readable`, a simulation's check before
its clients start) and loading them as model input (`load_image_folder`, what each client
process does once) at 64x64x3 and, for comparison, 28x28x1.

Then runs `run_simulation.py` on that folder and on MNIST in turn, with the same training
a round: 4 clients of N/4 images each. The folder task has 4 clients; MNIST is split over
60,000 / (N/4) clients of which 4 are sampled a round, so that its clients too train N/4
images each. No validation split and no federated evaluation. The server evaluates only at
the last round (`eval_every` = rounds): MNIST's 10,000 test images there, nothing for the
folder task (no test_dir); rounds 2..N-1 (round 1 starts the workers) are compared, so
both figures are training only. Timings are measured, never asserted.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from fl_app.config import compose_config
from fl_app.data import class_names, load_dataset
from fl_app.image_folder import check_readable, list_images, load_image_folder
from fl_app.model import build_model

REPO = Path(__file__).resolve().parents[1]
FOLDER_SHAPE = (64, 64, 3)
MNIST_SHAPE = (28, 28, 1)
MNIST_TRAIN_IMAGES = 60_000
CLIENTS_A_ROUND = 4


def summary(values: list[float], digits: int = 0) -> str:
    return (f"{statistics.median(values):,.{digits}f} "
            f"(min {min(values):,.{digits}f}, max {max(values):,.{digits}f})")


def write_folder(root: Path, count: int) -> tuple[str, ...]:
    """The first `count` Fashion-MNIST training images as FOLDER_SHAPE PNGs in
    `root/<class name>/<i>.png`; returns the class names."""
    x_train, y_train, _, _ = load_dataset("fashion_mnist", compose_config().dataset.data_dir)
    classes = class_names("fashion_mnist")
    for name in classes:
        (root / name).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(x_train[:count], y_train[:count])):
        resized = Image.fromarray(image[:, :, 0]).resize(FOLDER_SHAPE[:2], Image.BILINEAR)
        resized.convert("RGB").save(root / classes[label] / f"{i}.png")
    return classes


def rates(step: Callable[[], object], count: int, repeats: int = 3) -> list[float]:
    """Images/s of `count` images handled by `step`, once per repeat."""
    measured = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        measured.append(count / (time.perf_counter() - started))
    return measured


def loading_rates(folder: Path, classes: tuple[str, ...]) -> dict[str, list[float]]:
    """Images/s of listing, decoding and loading the folder as model input."""
    files = [path for path, _ in list_images(folder, classes)]
    steps = {
        "list_images (listing only)": lambda: list_images(folder, classes),
        "check_readable (PIL decode only)": lambda: check_readable(files),
        "load_image_folder at 64x64x3": lambda: load_image_folder(folder, classes, FOLDER_SHAPE),
        "load_image_folder at 28x28x1": lambda: load_image_folder(folder, classes, MNIST_SHAPE),
    }
    return {label: rates(step, len(files)) for label, step in steps.items()}


def seed_cnn_cost(shape: tuple[int, int, int]) -> dict[str, int]:
    """seed_cnn's parameters for `shape` (10 classes), those of its Dense layer after
    Flatten, and its multiply-adds per image in a forward pass (each kernel's size times
    the positions it is applied at)."""
    model = build_model("seed_cnn", shape, 10, "adam", "sparse_categorical_crossentropy", 0.002)
    dense = next(layer for layer in model.layers if layer.name.startswith("dense"))
    multiply_adds = sum(math.prod(layer.kernel.shape) * math.prod(layer.output.shape[1:-1])
                        for layer in model.layers if hasattr(layer, "kernel"))
    return {"params": model.count_params(), "dense_params": dense.count_params(),
            "multiply_adds": multiply_adds}


def round_records(run_dir: Path, rounds: int, *overrides: str) -> list[dict]:
    """Run `run_simulation.py` training only (see the top of this file); the records of
    rounds 2..rounds-1 from its metrics.json."""
    cmd = [sys.executable, "run_simulation.py", f"num_rounds={rounds}", "fraction_evaluate=0",
           "min_evaluate_clients=0", "dataset.val_fraction=0", f"eval_every={rounds}",
           f"hydra.run.dir={run_dir}", *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    history = json.loads((run_dir / "metrics.json").read_text())
    return [r for r in history if 1 < r["round"] < rounds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000,
                        help="images in the folder (at most 60,000), split over 4 clients")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds per run (at least 3: round 1 starts the workers, the last evaluates)")
    args = parser.parse_args()
    if args.rounds < 3 or not CLIENTS_A_ROUND <= args.images <= MNIST_TRAIN_IMAGES:
        parser.error("--rounds must be at least 3 and --images 4..60,000")

    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool"
        started = time.perf_counter()
        classes = write_folder(pool, args.images)
        print(f"wrote {args.images:,} PNGs ({'x'.join(map(str, FOLDER_SHAPE))}) in "
              f"{time.perf_counter() - started:.1f} s")
        loading = loading_rates(pool, classes)
        for label, measured in loading.items():
            print(f"  {label:34s} {summary(measured)} images/s")

        mnist_clients = MNIST_TRAIN_IMAGES // (args.images // CLIENTS_A_ROUND)
        runs = {
            # Flower samples int(fraction_fit x clients) clients: 4.
            "MNIST": (MNIST_SHAPE, round_records(
                Path(tmp) / "mnist", args.rounds, f"num_clients={mnist_clients}",
                f"fraction_fit={(CLIENTS_A_ROUND + 0.5) / mnist_clients}")),
            "image folder": (FOLDER_SHAPE, round_records(
                Path(tmp) / "folder", args.rounds, "dataset=image_folder", f"dataset.train_dir={pool}",
                f"dataset.image_size=[{FOLDER_SHAPE[0]},{FOLDER_SHAPE[1]}]",
                f"dataset.channels={FOLDER_SHAPE[2]}", f"num_clients={CLIENTS_A_ROUND}")),
        }

    rows = {}
    for task, (shape, records) in runs.items():
        cost = seed_cnn_cost(shape)
        rows[task] = {
            "shape": "x".join(map(str, shape)), **cost,
            "seconds": [r["round_seconds"] for r in records],
            "images": records[0]["train_examples"],
            "rates": [r["train_examples"] / r["round_seconds"] for r in records],
        }
    mnist, folder = rows["MNIST"], rows["image folder"]
    speed = statistics.median(folder["rates"]) / statistics.median(mnist["rates"])

    print(f"\n=== summary: {args.images:,} images, rounds 2..{args.rounds - 1} of {args.rounds}, "
          f"training only (server evaluation at the last round only) ===")
    print("loading the folder (images/s, median of 3):")
    for label, measured in loading.items():
        print(f"  {label:34s} {statistics.median(measured):,.0f}")
    print(f"\n{'task':13s} {'input':8s} {'seed_cnn params':>15s} {'images/round':>12s} "
          f"{'s/round median (min-max)':>26s} {'training images/s':>17s}")
    for task, row in rows.items():
        seconds = f"{statistics.median(row['seconds']):.2f} ({min(row['seconds']):.2f}-{max(row['seconds']):.2f})"
        print(f"{task:13s} {row['shape']:8s} {row['params']:>15,} {row['images']:>12,} "
              f"{seconds:>26s} {statistics.median(row['rates']):>17,.0f}")
    print(f"folder task's training images/s / MNIST's: {speed:.2f}")
    print("\nwhere the time goes (seed_cnn, per image):")
    for task, row in rows.items():
        print(f"  {task:13s} {row['params']:>10,} parameters, {row['dense_params']:,} "
              f"({row['dense_params'] / row['params']:.1%}) in the Dense layer after Flatten; "
              f"{row['multiply_adds']:,} multiply-adds a forward pass")
    print(f"  folder / MNIST: {folder['params'] / mnist['params']:.1f}x the parameters, "
          f"{folder['multiply_adds'] / mnist['multiply_adds']:.1f}x the multiply-adds, "
          f"{1 / speed:.1f}x the seconds per image")


if __name__ == "__main__":
    main()
