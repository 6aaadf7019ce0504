"""Use a trained model: `python -m fl_app.predict MODEL IMAGES...` (or `fl-app-predict`).

Classifies image files, or every image under a directory, and prints and writes a CSV
(file, predicted class, confidence, top 3); with `--split` it instead measures the
model's accuracy on a known dataset. Images of any size, colour or grey, are converted
exactly as a partner's image folder is (`fl_app.image_folder.read_image`), so the model
sees them as it saw its training data. No Flower here.
"""

import argparse
import csv
import os
import sys
import zipfile
from pathlib import Path

from fl_app.console import import_tensorflow_into_the_log

import_tensorflow_into_the_log()  # before Keras: TensorFlow's start-up lines would bury the results

import keras
import numpy as np
from omegaconf import OmegaConf

from fl_app.config_schema import BUILT_IN_DATASETS, IMAGE_FOLDER_SETTINGS, ConfigError, DatasetConfig
from fl_app.data import DatasetError, scale_images
from fl_app.image_folder import IMAGE_SUFFIXES, read_image
from fl_app.task import Task, central_test_set, task_of, training_set

BATCH_SIZE = 1000
TOP_K = 3

EXAMPLES = """examples:
  python -m fl_app.predict outputs/2025-06-01/10-00-00/model.keras scan.png my_images/
  python -m fl_app.predict model.keras --dataset fashion_mnist shoe.jpg -o shoe.csv
  python -m fl_app.predict model.keras --dataset mnist --split test
  python -m fl_app.predict outputs/skin --split test   # a run's model, on its test_dir

A bad image among many is reported and skipped; the rest are classified. Exit status:
0 if every image was classified, 1 if one was skipped or nothing could be done,
2 for wrong arguments."""


class PredictError(Exception):
    """A problem with the user's input: printed without a traceback."""


def model_file(path: Path) -> Path:
    """`path`, or the model.keras in a run's output directory `path`."""
    if not path.is_dir():
        return path
    if not (path / "model.keras").is_file():
        raise PredictError(f"{path}: no model.keras in this directory (a run writes it when it ends)")
    return path / "model.keras"


def load_model(path: Path) -> keras.Model:
    if not path.is_file():
        raise PredictError(f"{path}: no such model file")
    if path.suffix not in (".keras", ".h5"):
        raise PredictError(f"{path}: not a Keras model file (.keras, or legacy .h5)")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):  # else Keras says "not found"
        raise PredictError(f"{path}: not a Keras model: a .keras file is a zip archive, this is not")
    try:
        return keras.models.load_model(path, compile=False)  # predicting needs no optimizer
    except Exception as err:  # Keras raises ValueError, OSError, zipfile errors, ...
        raise PredictError(f"{path}: cannot be loaded as a Keras model: {err}") from err


def task_of_run(model_path: Path, data_dir: str) -> Task:
    """The task (class names, image shape, test set) in the config.yaml that a run writes
    beside its model.keras; a built-in dataset's files are looked for in `data_dir`."""
    config = model_path.parent / "config.yaml"
    if not config.is_file():
        raise PredictError(
            f"name the model's dataset with --dataset: {model_path} has no config.yaml beside it"
        )
    try:
        written = OmegaConf.load(config).dataset
        settings = {key: written.get(key) for key in IMAGE_FOLDER_SETTINGS}
        return task_of(DatasetConfig(written.name, data_dir, val_fraction=0.0, **settings))
    except (ConfigError, AttributeError, TypeError, ValueError) as err:
        raise PredictError(f"{config}: not the config.yaml of an fl_app run ({err})") from err


def check_model_fits(model: keras.Model, path: Path, task: Task) -> None:
    """The model must take the task's image shape and give one output per class."""
    takes, gives = tuple(model.input_shape[1:]), model.output_shape[-1]
    if takes != task.image_shape or gives != len(task.classes):
        raise PredictError(
            f"{path} takes input {takes} and gives {gives} outputs, but {task.dataset} images are "
            f"{task.image_shape} with {len(task.classes)} classes: is --dataset right?"
        )


def image_files(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """(image files, problems): files as named, directories searched recursively for image
    files (hidden entries ignored, sorted); a missing path or empty directory is a problem."""
    files, problems = [], []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                problems.append(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory")
            files += found
        elif path.exists():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or directory")
    return files, problems


def classify(model: keras.Model, task: Task, paths: list[Path], output: Path) -> int:
    """Classify the images, print the rows and write them to `output`; return how many
    paths were skipped (each reported on stderr)."""
    files, problems = image_files(paths)
    shape, names = task.image_shape, task.classes
    images, readable = [], []
    for path in files:
        try:
            images.append(read_image(path, shape))
            readable.append(path)
        except DatasetError as err:
            problems.append(str(err))
    for problem in problems:
        print(f"predict: skipped {problem}", file=sys.stderr)
    if not readable:
        raise PredictError("no image could be read: nothing classified")

    probabilities = model.predict(scale_images(np.stack(images)), batch_size=BATCH_SIZE, verbose=0)
    rows = []
    for path, p in zip(readable, probabilities):
        top = np.argsort(p)[::-1][:TOP_K]
        rows.append({
            "file": str(path),
            "predicted": names[top[0]],
            "confidence": f"{p[top[0]]:.4f}",
            "top3": " ".join(f"{names[k]}:{p[k]:.4f}" for k in top),
        })
    with open(output, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    width = max(len(row["file"]) for row in rows)
    print(f"{'file':<{width}}  {'predicted':<12} {'confidence':<10}  top {TOP_K}")
    for row in rows:
        print(f"{row['file']:<{width}}  {row['predicted']:<12} {row['confidence']:<10}  {row['top3']}")
    print(f"{len(rows)} image(s) classified, written to {output}"
          + (f"; {len(problems)} skipped" if problems else ""))
    return len(problems)


def evaluate_split(model: keras.Model, task: Task, split: str) -> None:
    """Print the model's accuracy on the task's test set (a built-in one, or `test_dir`) or
    its pooled training set (a built-in one, or `train_dir`)."""
    if split == "test":
        test = central_test_set(task)
        if test is None:
            raise PredictError(f"the {task.dataset} task has no test set: give the run's config "
                               "a dataset.test_dir, or classify a folder of images instead")
        images, labels = test
    elif task.clients_dir:
        raise PredictError("the run's training images are its parties' folders (dataset.clients_dir), "
                           "not one training set: classify a folder of images instead")
    else:
        x_train, labels = training_set(task)
        images = scale_images(x_train)
    predicted = model.predict(images, batch_size=BATCH_SIZE, verbose=0).argmax(axis=1)
    wrong = int(np.sum(predicted != labels))
    print(f"accuracy {1 - wrong / len(labels):.4f} on the {len(labels):,} {split} images of "
          f"{task.dataset} ({wrong:,} wrong)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fl_app.predict",
        description="Classify image files with a trained fl_app model (model.keras of a run), "
        "or measure its accuracy on a dataset's test set.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="the Keras model file, or a run's output directory "
                        "(its model.keras)")
    parser.add_argument(
        "images", type=Path, nargs="*",
        help=f"image files ({', '.join(IMAGE_SUFFIXES)}; any size, colour or grey) or "
        "directories, searched recursively",
    )
    parser.add_argument(
        "--dataset", choices=BUILT_IN_DATASETS,
        help="the built-in dataset the model was trained on: its class names and image shape "
        "(default: the task in the config.yaml beside MODEL, own class names included)",
    )
    parser.add_argument(
        "--split", choices=("test", "train"),
        help="instead of classifying IMAGES, print the accuracy on this split of the task "
        "(an image-folder task's test_dir or train_dir)",
    )
    parser.add_argument(
        "--data-dir", default=os.environ.get("FL_APP_DATA_DIR", "data"),
        help="folder holding the datasets, for --split (default: $FL_APP_DATA_DIR, else data)",
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("predictions.csv"),
        help="the CSV to write: file, predicted, confidence, top3 (default: predictions.csv)",
    )
    args = parser.parse_intermixed_args(argv)  # IMAGES may come before or after options
    if bool(args.images) == bool(args.split):
        parser.error("give either IMAGES to classify or --split to evaluate on, not both or neither")
    try:
        path = model_file(args.model)
        model = load_model(path)
        if args.dataset:
            task = task_of(DatasetConfig(args.dataset, args.data_dir, val_fraction=0.0))
        else:
            task = task_of_run(path, args.data_dir)
        check_model_fits(model, path, task)
        if args.split:
            evaluate_split(model, task, args.split)
        elif classify(model, task, args.images, args.output):
            sys.exit(1)
    except (PredictError, DatasetError) as err:
        print(f"predict: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
