"""Pretraining, then transfer: does a federation that starts from a pretrained network learn
a small task better than one that starts from scratch?

    FL_APP_DATA_DIR=../shared/datasets python -m benchmarks.transfer [--pretrain-rounds 16]
        [--pretrain-epochs 4] [--pretrain-lr 0.005] [--rounds 15] [--epochs 5] [--per-class 50]
        [--pretrained RUN/model.keras] [--skip-floor]

No ImageNet download is possible here, so the pretrained network is made by a federation
first. Step 1 writes the first N Fashion-MNIST training images (all 10 classes) as 32x32
RGB PNGs into one pooled folder, and 1,000 of its test images into a test folder, then
trains `mobilenet_v3_small` from random weights on them (`model.train=all`, 4 clients of
the pool, no held-out split; the server evaluates on the test folder). Its model.keras is
the pretrained network (`--pretrained` skips this step and uses a given one). Its default
16 rounds x 4 local epochs give each client about 3,000 steps: MobileNetV3's batch
normalisation (momentum 0.999) follows the data slowly, and the test accuracy, which uses
its moving statistics, stays at chance for the first ~650-950 steps (docs/own-data.md).

Step 2 is another task in another domain: MNIST digits 0-4 as classes "zero".."four", 3
parties (`dataset.clients_dir`) of `--per-class` images per class each (disjoint MNIST
training images), 32x32 RGB, no test set: each party holds out 20 % and the clients'
held-out images measure the run. It is trained with the same rounds, epochs, learning
rate and seed four times: (a) from scratch, everything trains; (b) `init_from` the
pretrained network, `model.train=head` (the backbone is frozen, only the new 5-class head
trains and travels); (c) `init_from`, `model.train=all` (fine-tune everything); (d) from
scratch, `model.train=head` (a random frozen backbone: the floor; its features are
practically zero, so the head cannot learn). `init_from` takes all the pretrained weights
but the classification layer's, since the class counts differ.

Printed: each run's exact command, and a table of the final and best federated accuracy
(`eval_accuracy`), the final macro F1, mean seconds a round (rounds 2..N: round 1 starts
the workers), bytes each client receives and sends a round, and the run's wall time.
Accuracies and timings are measured, never asserted.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.cli import simulate
from fl_app.config import compose_config
from fl_app.data import class_names, load_dataset
from fl_app.task import held_out_size

SIZE = (32, 32)  # (height, width) of both tasks: init_from needs the same input shape
DIGITS = ("zero", "one", "two", "three", "four")  # MNIST labels 0-4, renamed
PARTIES = 3
VAL_FRACTION = 0.2  # of each party's images, held out: they measure the target-task runs
PRETRAIN_CLIENTS = 4
TEST_IMAGES = 1_000
RUNS = {  # label -> overrides of the target task's runs (init_from added where marked)
    "(a) scratch, train=all": (False, "all"),
    "(b) pretrained, train=head": (True, "head"),
    "(c) pretrained, train=all": (True, "all"),
    "(d) scratch, train=head (floor)": (False, "head"),
}


def save_png(image: np.ndarray, path: Path) -> None:
    """A uint8 (28, 28, 1) image as a SIZE RGB PNG."""
    Image.fromarray(image[..., 0], "L").convert("RGB").resize(SIZE[::-1], Image.BILINEAR).save(path)


def write_classes(root: Path, images: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> None:
    """`images` as root/<names[label]>/<i>.png."""
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        save_png(image, root / names[int(label)] / f"{i:06d}.png")


def write_pretraining_task(root: Path, count: int) -> tuple[Path, Path]:
    """The first `count` Fashion-MNIST training images in root/pool and the first
    TEST_IMAGES test images in root/test, as class folders."""
    x_train, y_train, x_test, y_test = load_dataset("fashion_mnist", compose_config().dataset.data_dir)
    names = class_names("fashion_mnist")
    write_classes(root / "pool", x_train[:count], y_train[:count], names)
    write_classes(root / "test", x_test[:TEST_IMAGES], y_test[:TEST_IMAGES], names)
    return root / "pool", root / "test"


def write_target_task(root: Path, per_class: int) -> Path:
    """MNIST digits 0-4 as DIGITS: PARTIES party folders of `per_class` images per class,
    no image in two parties."""
    x_train, y_train, _, _ = load_dataset("mnist", compose_config().dataset.data_dir)
    for party in range(PARTIES):
        chosen = np.concatenate([np.flatnonzero(y_train == digit)[party * per_class:(party + 1) * per_class]
                                 for digit in range(len(DIGITS))])
        write_classes(root / f"party_{party}", x_train[chosen], y_train[chosen], DIGITS)
    return root


def mean_round_seconds(history: list[dict]) -> float:
    """Mean seconds of rounds 2..N (round 1 also starts the workers)."""
    later = [r["round_seconds"] for r in history if r["round"] > 1] or [history[0]["round_seconds"]]
    return statistics.mean(later)


def summarise(history: list[dict], wall: float, key: str) -> dict:
    """The figures of the table, `key` being the accuracy that measures the run."""
    measured = [r for r in history if key in r]
    return {
        "rounds": len(history),
        "final": measured[-1][key] if measured else float("nan"),
        "best": max((r[key] for r in measured), default=float("nan")),
        "best_round": max(measured, key=lambda r: r[key])["round"] if measured else 0,
        "f1": measured[-1].get("eval_macro_f1", float("nan")) if measured else float("nan"),
        "train_accuracy": history[-1].get("train_accuracy", float("nan")),
        "seconds": mean_round_seconds(history),
        "first_round": history[0]["round_seconds"],
        "bytes": history[-1]["bytes_per_client"],
        "wall": wall,
        "curve": [round(r[key], 3) for r in measured],
    }


def pretrain(root: Path, args: argparse.Namespace) -> tuple[Path, dict, str]:
    """Step 1: the federation on Fashion-MNIST; its model.keras, figures and command."""
    started = time.perf_counter()
    pool, test = write_pretraining_task(root / "fashion", args.pretrain_images)
    print(f"wrote {args.pretrain_images:,} + {TEST_IMAGES:,} Fashion-MNIST PNGs (32x32 RGB) in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    run_dir = root / "pretrain"
    history, wall, command = simulate(
        run_dir, "dataset=image_folder", f"dataset.train_dir={pool}", f"dataset.test_dir={test}",
        f"dataset.image_size=[{SIZE[0]},{SIZE[1]}]", "dataset.channels=3", "dataset.val_fraction=0",
        "fraction_evaluate=0", "min_evaluate_clients=0", "model=mobilenet_v3_small", "model.weights=null",
        "model.train=all", f"num_clients={PRETRAIN_CLIENTS}", f"num_rounds={args.pretrain_rounds}",
        f"local_epochs={args.pretrain_epochs}", f"learning_rate={args.pretrain_lr}",
        f"batch_size={args.batch_size}", f"seed={args.seed}")
    return run_dir / "model.keras", summarise(history, wall, "test_accuracy"), command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-images", type=int, default=6_000,
                        help="Fashion-MNIST training images of the pretraining (at most 60,000)")
    parser.add_argument("--pretrain-rounds", type=int, default=16)
    parser.add_argument("--pretrain-epochs", type=int, default=4, help="local epochs of the pretraining")
    parser.add_argument("--pretrain-lr", type=float, default=0.005, help="learning rate of the pretraining")
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="an earlier pretraining's model.keras (32x32x3 mobilenet_v3_small): skip step 1")
    parser.add_argument("--per-class", type=int, default=50,
                        help="images per class per party of the target task (20 %% held out)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of each target-task run")
    parser.add_argument("--epochs", type=int, default=5, help="local epochs of each target-task run")
    parser.add_argument("--lr", type=float, default=0.002, help="learning rate of each target-task run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-floor", action="store_true", help="leave out run (d)")
    args = parser.parse_args()
    if args.rounds < 2 or args.pretrain_rounds < 1 or not 5 <= args.per_class <= 1_000:
        parser.error("--rounds must be at least 2, --pretrain-rounds at least 1, --per-class 5..1,000")

    overall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.pretrained is None:
            pretrained, pre, pre_command = pretrain(root, args)
            print(f"pretraining: test accuracy by round {pre['curve']} (chance 0.10); "
                  f"{pre['seconds']:.1f} s a round after the first, {pre['wall']:.0f} s in all", flush=True)
        else:
            pretrained, pre, pre_command = args.pretrained.resolve(), None, None

        sites = write_target_task(root / "digits", args.per_class)
        common = ["dataset=image_folder", f"dataset.clients_dir={sites}",
                  f"dataset.image_size=[{SIZE[0]},{SIZE[1]}]", "dataset.channels=3",
                  f"dataset.val_fraction={VAL_FRACTION}", "model=mobilenet_v3_small", "model.weights=null",
                  f"num_rounds={args.rounds}", f"local_epochs={args.epochs}", f"learning_rate={args.lr}",
                  f"batch_size={args.batch_size}", f"seed={args.seed}"]
        results, commands = {}, {}
        for label, (from_pretrained, train) in RUNS.items():
            if args.skip_floor and label.startswith("(d)"):
                continue
            extra = [f"model.train={train}"] + ([f"init_from={pretrained}"] if from_pretrained else [])
            history, wall, commands[label] = simulate(root / f"run_{label[1]}", *common, *extra)
            results[label] = summarise(history, wall, "eval_accuracy")
            print(f"  {label}: eval accuracy by round {results[label]['curve']}", flush=True)

    chance = 1 / len(DIGITS)
    held_out = PARTIES * held_out_size(len(DIGITS) * args.per_class, VAL_FRACTION)
    print(f"\n=== summary: {time.perf_counter() - overall:.0f} s in all ===")
    if pre is not None:
        print(f"\nStep 1, pretraining on Fashion-MNIST ({args.pretrain_images:,} images, {PRETRAIN_CLIENTS} "
              f"clients, {args.pretrain_rounds} rounds x {args.pretrain_epochs} local epochs, learning rate "
              f"{args.pretrain_lr}):\n  {pre_command}")
        print(f"  test accuracy ({TEST_IMAGES:,} test images, chance 0.10): final {pre['final']:.4f}, best "
              f"{pre['best']:.4f} (round {pre['best_round']}); by round {pre['curve']}; train accuracy "
              f"{pre['train_accuracy']:.4f}; {pre['first_round']:.1f} s round 1, {pre['seconds']:.1f} s a "
              f"round after; {pre['bytes']:,} bytes a client a round; {pre['wall']:.0f} s wall")
    else:
        print(f"\nStep 1 skipped: pretrained network {pretrained}")
    print(f"\nStep 2, MNIST digits 0-4 ({PARTIES} parties x {len(DIGITS)} classes x {args.per_class} images, "
          f"{held_out} held out in all; chance {chance:.2f}), {args.rounds} rounds x {args.epochs} local "
          f"epochs, learning rate {args.lr}:")
    for label, command in commands.items():
        print(f"  {label}:\n    {command}")
    print("\n| run | final eval_accuracy | best (round) | final eval_macro_f1 | rounds | s/round (2..N) "
          "| bytes/client | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['final']:.4f} | {r['best']:.4f} ({r['best_round']}) | {r['f1']:.4f} | "
              f"{r['rounds']} | {r['seconds']:.2f} | {r['bytes']:,} | {r['wall']:.0f} |")
    print("\naccuracy by round:")
    for label, r in results.items():
        print(f"  {label}: {r['curve']}")


if __name__ == "__main__":
    main()
