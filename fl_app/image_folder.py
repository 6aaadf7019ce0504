"""A party's own images: a folder with one sub-folder per class (no Flower here).

    my_images/
        0/ scan_001.png scan_002.jpg ...
        1/ ...

Sub-folders are named by the federation's class names (`data.class_names`, e.g. "0".."9"
for MNIST); images may have any size and colour mode and are converted to the model's
input (H, W, C) by Keras' `load_img`, the loader behind Keras' own
`image_dataset_from_directory`. That function is not used itself because it defers
decoding to a tf.data pipeline, so an unreadable file would surface mid-training as a
TensorFlow error without its name; here every problem is found while loading, and the
error says which folder or file and what is wrong.
"""

from pathlib import Path

import keras
import numpy as np

from fl_app.data import DatasetError

# The file types Keras' image_dataset_from_directory reads; other files are ignored.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


def load_image_folder(
    folder: str | Path, class_names: tuple[str, ...], image_shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels uint8 (N,)) of every image under `folder`.

    Raises `DatasetError` when the folder is missing, its class folders are not exactly
    `class_names`, it holds no image, or an image cannot be read.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    expected = ", ".join(class_names)
    unknown = [name for name in found if name not in class_names]
    if unknown:
        raise DatasetError(
            f"{root}: unknown class folder(s) {', '.join(unknown)}; "
            f"the federation's classes are: {expected}"
        )
    missing = [name for name in class_names if name not in found]
    if missing:
        raise DatasetError(
            f"{root}: no folder for class(es) {', '.join(missing)}; the federation's classes are: "
            f"{expected} (one sub-folder each, empty if you hold no image of that class)"
        )
    files = [
        (path, label)
        for label, name in enumerate(class_names)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    ]
    if not files:
        raise DatasetError(
            f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders"
        )
    images = np.empty((len(files), *image_shape), np.uint8)
    for i, (path, _) in enumerate(files):
        images[i] = read_image(path, image_shape)
    return images, np.array([label for _, label in files], np.uint8)


def read_image(path: str | Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """One image file as uint8 (H, W, C), resized and converted to grey or RGB as the model
    takes it (also what `fl_app.predict` classifies). Raises `DatasetError` naming the file."""
    height, width, channels = image_shape
    try:
        image = keras.utils.load_img(
            path,
            color_mode="grayscale" if channels == 1 else "rgb",
            target_size=(height, width),
            interpolation="bilinear",
        )
    except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise DatasetError(f"{path}: cannot be read as an image: {err}") from err
    return np.asarray(image, np.uint8).reshape(image_shape)
