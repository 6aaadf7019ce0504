"""Images in class folders, a party's own or a task's test set (no Flower here).

    my_images/
        benign/ scan_001.png scan_002.jpg ...
        malignant/ ...

Sub-folders are named by the task's class names; a class a party does not hold needs no
folder (or an empty one). Images may have any size and colour mode and are converted to
the model's input (H, W, C) by Keras' `load_img`, the loader behind Keras' own
`image_dataset_from_directory`. That function is not used itself because it defers
decoding to a tf.data pipeline, so an unreadable file would surface mid-training as a
TensorFlow error without its name; here every problem is found while loading, and the
error says which folder or file and what is wrong.
"""

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from fl_app.data import DatasetError

# The file types Keras' image_dataset_from_directory reads; other files are ignored.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


def sub_folders(folder: str | Path) -> list[str]:
    """The names of `folder`'s visible sub-folders, sorted (class or party folders)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a directory", "no image folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder: str | Path, class_names: tuple[str, ...]) -> list[tuple[Path, int]]:
    """(file, label) of every image under `folder`'s class folders, class by class, without
    reading them. Raises `DatasetError` when a class folder is not one of `class_names` or
    no class folder holds an image."""
    root = Path(folder).expanduser()
    unknown = [name for name in sub_folders(root) if name not in class_names]
    if unknown:
        raise DatasetError(
            f"{root}: unknown class folder(s) {', '.join(unknown)}; "
            f"the task's classes are: {', '.join(class_names)}",
            "unknown class folder(s)",
        )
    files = [
        (path, label)
        for label, name in enumerate(class_names)
        if (root / name).is_dir()
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    ]
    if not files:
        raise DatasetError(
            f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in class folders named "
            f"{', '.join(class_names)}",
            "no images in class folders",
        )
    return files


def load_image_folder(
    folder: str | Path, class_names: tuple[str, ...], image_shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels uint8 (N,)) of every image under `folder`.

    Raises `DatasetError` as `list_images` does, or naming an image that cannot be read.
    """
    files = list_images(folder, class_names)
    images = np.empty((len(files), *image_shape), np.uint8)

    def read(i: int) -> None:
        images[i] = read_image(files[i][0], image_shape)

    _on_threads(read, range(len(files)))
    return images, np.array([label for _, label in files], np.int64)


def check_readable(files: list[Path]) -> None:
    """Decode every file (without converting it): raises `DatasetError` naming the first
    that is not an image, so a run can stop before its clients start."""

    def decode(path: Path) -> None:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
            raise DatasetError(f"{path}: cannot be read as an image: {err}", "an unreadable image") from err

    _on_threads(decode, files)


def _on_threads(function: Callable, items: Sequence) -> None:
    """function(item) for each item, on a thread per CPU, each taking every n-th item: PIL
    decodes without holding the GIL, and one task per thread (not per item) keeps the
    pool's own cost off small images. Raises the error of the first failing item in order."""
    threads = max(1, min(os.cpu_count() or 1, len(items)))
    errors: dict[int, Exception] = {}

    def run(first: int) -> None:
        for i in range(first, len(items), threads):
            try:
                function(items[i])
            except Exception as err:  # kept, so that the first failing item is the one named
                errors[i] = err

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))
    if errors:
        raise errors[min(errors)]


def read_image(path: str | Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """One image file as uint8 (H, W, C), resized and converted to grey or RGB as the model
    takes it (also what `fl_app.predict` classifies). Raises `DatasetError` naming the file."""
    import keras  # here, not above: listing folders (a config's check) needs no TensorFlow

    height, width, channels = image_shape
    try:
        image = keras.utils.load_img(
            path,
            color_mode="grayscale" if channels == 1 else "rgb",
            target_size=(height, width),
            interpolation="bilinear",
        )
    except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise DatasetError(f"{path}: cannot be read as an image: {err}", "an unreadable image") from err
    return np.asarray(image, np.uint8).reshape(image_shape)
