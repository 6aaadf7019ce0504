"""MNIST / Fashion-MNIST loading from the four standard gzip IDX files.

This module knows nothing of Flower: it turns a folder of IDX files into numpy
arrays. Files already on disk are used as they are (only their structure is
checked, so users may bring their own copies); a missing file is downloaded
from the dataset's mirror and accepted only if its md5 matches, so offline
machines work with pre-placed files and online ones never keep a bad download.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import logging
import math
import os
import struct
import tempfile
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
IMAGE_SIZE = 28
NUM_CLASSES = 10
DOWNLOAD_TIMEOUT_S = 60

# split -> (images file, labels file)
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetError(ValueError):
    """A dataset file is missing, cannot be fetched, or is not valid IDX data."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives locally and remotely; md5 maps file name -> checksum."""

    name: str
    folder: str
    base_url: str
    md5: Mapping[str, str]


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        folder="mnist",
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        folder="fashion-mnist",
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}

DATASET_FOLDERS: dict[str, str] = {name: spec.folder for name, spec in DATASETS.items()}


def load_dataset(
    name: str, data_dir: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test) of the dataset called `name`.

    Images are uint8 (N, 28, 28), labels uint8 (N,). Files are read from
    <data_dir>/<DATASET_FOLDERS[name]>/; missing files are downloaded there first.
    """
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {known}")
    return load_idx_dataset(DATASETS[name], data_dir)


def load_idx_dataset(
    spec: DatasetSpec, data_dir: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Like load_dataset, for an explicit spec (e.g. another mirror, or a test server)."""
    folder = Path(data_dir) / spec.folder
    arrays = []
    for images_name, labels_name in SPLIT_FILES.values():
        images_path = _ensure_file(spec, folder, images_name)
        labels_path = _ensure_file(spec, folder, labels_name)
        images = _read_idx(images_path, IMAGE_MAGIC, (IMAGE_SIZE, IMAGE_SIZE))
        labels = _read_idx(labels_path, LABEL_MAGIC, ())
        if len(images) != len(labels):
            raise DatasetError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
            )
        bad = np.flatnonzero(labels >= NUM_CLASSES)
        if bad.size:
            raise DatasetError(
                f"{labels_path}: labels must be 0-{NUM_CLASSES - 1}, found {labels[bad[0]]} "
                f"at index {bad[0]} ({bad.size} bad labels)"
            )
        arrays += [images, labels]
    return tuple(arrays)


def scale_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1]: the model's input (one channel)."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetError(
            f"expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}"
        )
    return (images.astype(np.float32) / 255.0)[..., np.newaxis]


def _read_idx(path: Path, magic: int, dims: tuple[int, ...]) -> np.ndarray:
    """Decompress and check one IDX file: magic, item dims, and payload length vs. count."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: not a valid gzip file (corrupt or truncated): {e}") from e
    header_len = 4 * (2 + len(dims))
    if len(data) < header_len:
        raise DatasetError(
            f"{path}: truncated: {len(data)} bytes, shorter than its {header_len}-byte IDX header"
        )
    found_magic, count, *found_dims = struct.unpack(f">{2 + len(dims)}I", data[:header_len])
    if found_magic != magic:
        raise DatasetError(f"{path}: wrong magic number: expected {magic}, found {found_magic}")
    if tuple(found_dims) != dims:
        shape = "x".join(map(str, found_dims))
        raise DatasetError(f"{path}: images are {shape}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    expected_len = header_len + count * math.prod(dims)
    if len(data) != expected_len:
        raise DatasetError(
            f"{path}: truncated or padded: header says {count} items ({expected_len} bytes), "
            f"file holds {len(data)} bytes"
        )
    # Copy so callers get ordinary writable arrays (frombuffer on bytes is read-only).
    return np.frombuffer(data, np.uint8, offset=header_len).reshape(count, *dims).copy()


def _ensure_file(spec: DatasetSpec, folder: Path, filename: str) -> Path:
    """Return folder/filename, downloading it first if it is not there."""
    path = folder / filename
    if path.exists():
        return path
    url = spec.base_url.rstrip("/") + "/" + filename
    try:
        _download(url, path, spec.md5[filename])
    except (OSError, http.client.HTTPException) as e:
        raise DatasetError(
            f"{filename} is missing: looked for {path}, and the download from {url} failed ({e}). "
            f"Put the four IDX files of {spec.name!r} in {folder}, or set FL_APP_DATA_DIR / "
            f"dataset.data_dir to a folder holding a {spec.folder}/ sub-folder with them."
        ) from e
    return path


def _download(url: str, dest: Path, expected_md5: str) -> None:
    """Fetch url to dest atomically: only a file with the expected md5 ever appears at dest."""
    log.info("Downloading %s to %s", url, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        md5 = hashlib.md5()
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp,
        ):
            while chunk := resp.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
        if md5.hexdigest() != expected_md5:
            raise DatasetError(
                f"checksum mismatch for {url}: expected md5 {expected_md5}, got {md5.hexdigest()}"
            )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
