"""Head-only training (`model.train=head`) against training everything (`model.train=all`):
seconds a round and bytes a client a round, side by side in one run.

    FL_APP_DATA_DIR=../shared/datasets python -m benchmarks.head_only [--images 3000] [--rounds 6]
        [--size 96] [--no-profile]

Writes the first N Fashion-MNIST training images as SIZExSIZE RGB PNGs into one pooled
folder of class folders in a temporary directory, then runs `run_simulation.py` on it
twice with `mobilenet_v3_small` (random weights, the run's seed), 3 clients of N/3 images,
1 local epoch, training only (`dataset.val_fraction=0 fraction_evaluate=0`, no test set:
nothing evaluates): once with `model.train=all`, once with `model.train=head`. Round 1 is
reported apart: it starts the workers and, with `head`, holds each client's one-off pass
of its images through the frozen backbone (their features are then kept). Rounds 2..N
are summarised by their median (min-max). The features are kept per worker process, and a
client may be served by another worker in a later round, which then computes them once
more: with 3 clients on 2 workers, some of rounds 2-3 pay that pass again.

Then (unless --no-profile), where the time goes, in this process on one thread (one
client's share of the machine, `mode.num_cpus_per_client=1`): images/s of the backbone's
forward pass (what `head` pays once per image), of training the whole network (what `all`
pays every step), and of training the head alone on the features, with each one's
multiply-adds per image (each kernel's size times the positions it is applied at).
Timings are measured, never asserted.
"""

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fl_app import model as keras_model
from benchmarks.cli import simulate
from fl_app.config import compose_config
from fl_app.data import class_names, load_dataset, scale_images

CLIENTS = 3
MODEL = "mobilenet_v3_small"
PROFILE_IMAGES = 256  # images a profile step handles (after one untimed call)


def write_folder(root: Path, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` Fashion-MNIST training images as size x size RGB PNGs in
    `root/<class name>/<i>.png`; returns them as uint8 (N, size, size, 3) and their labels."""
    x_train, y_train, _, _ = load_dataset("fashion_mnist", compose_config().dataset.data_dir)
    names = class_names("fashion_mnist")
    for name in names:
        (root / name).mkdir(parents=True)
    images = np.empty((count, size, size, 3), np.uint8)
    for i, (image, label) in enumerate(zip(x_train[:count], y_train[:count])):
        picture = Image.fromarray(image[..., 0], "L").convert("RGB").resize((size, size), Image.BILINEAR)
        picture.save(root / names[label] / f"{i:06d}.png")
        images[i] = np.asarray(picture)
    return images, y_train[:count].astype(np.int64)


def multiply_adds(model) -> int:
    """Multiply-adds of one image's forward pass through `model`'s layers with a kernel
    (convolutions, depthwise convolutions, Dense), nested models included."""
    total = 0
    for layer in model.layers:
        if hasattr(layer, "layers"):
            total += multiply_adds(layer)
        elif getattr(layer, "kernel", None) is not None:
            total += math.prod(layer.kernel.shape) * math.prod(layer.output.shape[1:-1])
    return total


def rate(step, count: int) -> float:
    """Images/s of `step` handling `count` images, after one untimed call (tracing)."""
    step()
    started = time.perf_counter()
    step()
    return count / (time.perf_counter() - started)


def profile(images: np.ndarray, labels: np.ndarray, batch_size: int, learning_rate: float, seed: int) -> dict:
    """Images/s (one thread) and multiply-adds per image of the backbone's forward pass, of
    training the whole network and of training the head on the features."""
    keras_model.limit_threads(1)
    cfg = compose_config()
    x, y = scale_images(images[:PROFILE_IMAGES]), labels[:PROFILE_IMAGES]
    shape, classes = x.shape[1:], int(labels.max()) + 1

    def build(frozen: bool):
        return keras_model.build_model(MODEL, shape, classes, cfg.optimizer, cfg.loss, learning_rate,
                                       steps_per_execution=cfg.steps_per_execution, frozen=frozen)

    def train(model, inputs):
        return lambda: keras_model.train(model, inputs, y, epochs=1, batch_size=batch_size,
                                         learning_rate=learning_rate, seed=seed)

    whole = build(frozen=False)
    backbone, head = keras_model.head_on_features(build(frozen=True), cfg.optimizer, cfg.loss,
                                                  steps_per_execution=cfg.steps_per_execution)
    feats = keras_model.features(backbone, x, cfg.eval_batch_size)
    head_adds = multiply_adds(head)
    return {
        "features": feats.shape[1],
        "forward": (rate(lambda: keras_model.features(backbone, x, cfg.eval_batch_size), len(x)),
                    multiply_adds(whole) - head_adds),
        "train all": (rate(train(whole, x), len(x)), multiply_adds(whole)),
        "train head": (rate(train(head, feats), len(x)), head_adds),
        "params": (whole.count_params(), head.count_params()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3_000, help="images in the folder, split over 3 clients")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run (at least 2: round 1 is apart)")
    parser.add_argument("--size", type=int, default=96, help="image height and width (at least 32)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.002, help="learning rate")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-profile", action="store_true", help="leave out the one-thread profile")
    args = parser.parse_args()
    if args.rounds < 2 or not CLIENTS * 2 <= args.images <= 60_000 or args.size < 32:
        parser.error("--rounds must be at least 2, --images 6..60,000 and --size at least 32")

    overall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool"
        started = time.perf_counter()
        images, labels = write_folder(pool, args.images, args.size)
        print(f"wrote {args.images:,} PNGs ({args.size}x{args.size}x3) in {time.perf_counter() - started:.1f} s",
              flush=True)
        common = ["dataset=image_folder", f"dataset.train_dir={pool}",
                  f"dataset.image_size=[{args.size},{args.size}]", "dataset.channels=3", "dataset.val_fraction=0", "fraction_evaluate=0", "min_evaluate_clients=0",
                  f"model={MODEL}", "model.weights=null", f"num_clients={CLIENTS}", f"num_rounds={args.rounds}",
                  "local_epochs=1", f"batch_size={args.batch_size}", f"learning_rate={args.lr}", f"seed={args.seed}"]
        runs = {}
        for train in ("all", "head"):
            history, wall, command = simulate(Path(tmp) / train, *common, f"model.train={train}")
            later = [r["round_seconds"] for r in history if r["round"] > 1]
            runs[train] = {"command": command, "wall": wall, "first": history[0]["round_seconds"],
                           "rounds": [r["round_seconds"] for r in history],
                           "later": later, "bytes": history[-1]["bytes_per_client"],
                           "images": history[-1]["train_examples"],
                           "train_accuracy": history[-1].get("train_accuracy", float("nan"))}
            print(f"  {train}: round seconds {[r['round_seconds'] for r in history]}", flush=True)
    costs = None if args.no_profile else profile(images, labels, args.batch_size, args.lr, args.seed)

    def median(run: dict) -> float:
        return statistics.median(run["later"])

    whole, head = runs["all"], runs["head"]
    print(f"\n=== summary: {args.images:,} images of {args.size}x{args.size}x3, {CLIENTS} clients, "
          f"{args.rounds} rounds x 1 local epoch, training only; {time.perf_counter() - overall:.0f} s in all ===")
    for train, run in runs.items():
        print(f"  model.train={train}:\n    {run['command']}")
    print(f"\n| model.train | round 1 s | rounds 2..{args.rounds} s, median (min-max) | images/round "
          f"| training images/s (rounds 2..N) | bytes/client | last round's train accuracy | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for train, run in runs.items():
        print(f"| {train} | {run['first']:.2f} | {median(run):.2f} ({min(run['later']):.2f}-{max(run['later']):.2f}) "
              f"| {run['images']:,} | {run['images'] / median(run):,.0f} | {run['bytes']:,} "
              f"| {run['train_accuracy']:.4f} | {run['wall']:.0f} |")
    print(f"| all / head | {whole['first'] / head['first']:.1f}x | {median(whole) / median(head):.1f}x | "
          f"| | {whole['bytes'] / head['bytes']:.0f}x | | {whole['wall'] / head['wall']:.1f}x |")
    for train, run in runs.items():
        print(f"seconds of each round, model.train={train}: {run['rounds']}")
    if costs is not None:
        print(f"\nwhere the time goes (one thread, {PROFILE_IMAGES} images, batch {args.batch_size}; "
              f"{costs['params'][0]:,} parameters in all, {costs['params'][1]:,} in the head on "
              f"{costs['features']}-d features):")
        print("| step | images/s | multiply-adds per image (forward) |")
        print("|---|---|---|")
        for step in ("forward", "train all", "train head"):
            speed, adds = costs[step]
            label = {"forward": "backbone forward pass (head: once per image, round 1)",
                     "train all": "training the whole network (all: every step)",
                     "train head": "training the head on features (head: every step)"}[step]
            print(f"| {label} | {speed:,.0f} | {adds:,} |")
        share = args.images / CLIENTS
        print(f"a client's {share:,.0f} images, one thread: forward pass {share / costs['forward'][0]:.1f} s, "
              f"training everything {share / costs['train all'][0]:.1f} s, training the head "
              f"{share / costs['train head'][0]:.2f} s an epoch")


if __name__ == "__main__":
    main()
