"""MNIST / Fashion-MNIST (gzip IDX files) and CIFAR-10 (binary batches) as numpy arrays.

This module knows nothing of Flower: it turns a folder of dataset files into uint8
arrays of images (N, H, W, C) and labels (N,). Files already on disk are used as
they are (only their structure is checked, so users may bring their own copies); a
missing file is downloaded from the dataset's mirror (CIFAR-10: the archive holding
it) and accepted only if its md5 matches, so offline machines work with pre-placed
files and online ones never keep a bad download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import logging
import math
import os
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

log = logging.getLogger(__name__)

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
NUM_CLASSES = 10
DOWNLOAD_TIMEOUT_S = 60

# split -> (images file, labels file)
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"
# split -> batch files; each record is 1 label byte, then the red, green and blue planes.
CIFAR_SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}


class DatasetError(ValueError):
    """A dataset file is missing, cannot be fetched, or does not hold valid data.

    `kind`: the problem in a few words without any path or file name, which is all a
    deployment's coordinator learns of a partner's failure (the partner's log has the rest).
    """

    def __init__(self, message: str, kind: str = "a data file missing or corrupt") -> None:
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives locally and remotely; md5 maps file name -> checksum.

    file_format "idx": four gzip IDX files, fetched one by one from base_url;
    "cifar": binary batch files, fetched together as CIFAR_ARCHIVE from base_url.
    """

    name: str
    folder: str
    base_url: str
    md5: Mapping[str, str]
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]  # label i is class_names[i]; also the folder names of own images
    file_format: str = "idx"


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
        image_shape=(28, 28, 1),
        class_names=tuple(str(digit) for digit in range(10)),
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
        image_shape=(28, 28, 1),
        class_names=("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                     "sneaker", "bag", "ankle_boot"),
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        folder="cifar-10-batches-bin",  # the folder the archive extracts to
        base_url="https://www.cs.toronto.edu/~kriz/",
        md5={CIFAR_ARCHIVE: "c32a1d4ab5d03f1284b67883e8d87530"},
        image_shape=(32, 32, 3),
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck"),
        file_format="cifar",
    ),
}

DATASET_FOLDERS: dict[str, str] = {name: spec.folder for name, spec in DATASETS.items()}


def load_dataset(
    name: str, data_dir: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test) of the dataset called `name`.

    Images are uint8 (N, H, W, C), labels uint8 (N,). Files are read from
    <data_dir>/<DATASET_FOLDERS[name]>/; missing files are downloaded first.
    """
    spec = _spec(name)
    loader = load_cifar_dataset if spec.file_format == "cifar" else load_idx_dataset
    return loader(spec, data_dir)


def image_shape(name: str) -> tuple[int, int, int]:
    """(H, W, C) of the dataset's images: lets the model be built without reading data."""
    return _spec(name).image_shape


def class_names(name: str) -> tuple[str, ...]:
    """The dataset's class names, in label order."""
    return _spec(name).class_names


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {known}")
    return DATASETS[name]


def load_idx_dataset(
    spec: DatasetSpec, data_dir: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Like load_dataset, for an explicit IDX spec (e.g. another mirror, or a test server)."""
    folder = Path(data_dir) / spec.folder
    arrays = []
    for images_name, labels_name in SPLIT_FILES.values():
        images_path = _ensure_file(spec, folder, images_name)
        labels_path = _ensure_file(spec, folder, labels_name)
        images = _read_idx(images_path, IMAGE_MAGIC, spec.image_shape[:2])
        labels = _read_idx(labels_path, LABEL_MAGIC, ())
        if len(images) != len(labels):
            raise DatasetError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
            )
        _check_labels(labels_path, labels)
        arrays += [images.reshape(len(images), *spec.image_shape), labels]
    return tuple(arrays)


def load_cifar_dataset(
    spec: DatasetSpec, data_dir: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Like load_dataset, for an explicit CIFAR spec (e.g. another mirror, or a test server)."""
    folder = _ensure_cifar_files(spec, Path(data_dir))
    arrays = []
    for filenames in CIFAR_SPLIT_FILES.values():
        images, labels = zip(*(_read_cifar_batch(folder / f, spec.image_shape) for f in filenames))
        arrays += [np.concatenate(images), np.concatenate(labels)]
    return tuple(arrays)


def scale_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, H, W, C) in [0, 1]: the model's input.

    One pass, dividing in float32 (the same values as `astype(float32) / 255`): a quarter
    of the time of two passes (docs/benchmarks.md, "Figures behind the code's choices").
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DatasetError(
            f"expected uint8 images of shape (N, H, W, C), got {images.dtype} {images.shape}"
        )
    return np.divide(images, np.float32(255), dtype=np.float32)


def _check_labels(path: Path, labels: np.ndarray) -> None:
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise DatasetError(
            f"{path}: labels must be 0-{NUM_CLASSES - 1}, found {labels[bad[0]]} "
            f"at index {bad[0]} ({bad.size} bad labels)"
        )


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
        found, expected = "x".join(map(str, found_dims)), "x".join(map(str, dims))
        raise DatasetError(f"{path}: images are {found}, expected {expected}")
    expected_len = header_len + count * math.prod(dims)
    if len(data) != expected_len:
        raise DatasetError(
            f"{path}: truncated or padded: header says {count} items ({expected_len} bytes), "
            f"file holds {len(data)} bytes"
        )
    # Copy so callers get ordinary writable arrays (frombuffer on bytes is read-only).
    return np.frombuffer(data, np.uint8, offset=header_len).reshape(count, *dims).copy()


def _read_cifar_batch(path: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Check and decode one batch file: records of 1 label byte + C planes of H x W pixels."""
    data = path.read_bytes()
    record_len = 1 + math.prod(shape)
    if not data:
        raise DatasetError(f"{path}: empty file")
    if len(data) % record_len:
        raise DatasetError(
            f"{path}: truncated or padded: {len(data)} bytes is not a multiple of the "
            f"{record_len}-byte record (1 label byte + {'x'.join(map(str, shape))} pixels)"
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, record_len)
    labels = records[:, 0].copy()
    _check_labels(path, labels)
    height, width, channels = shape
    planes = records[:, 1:].reshape(-1, channels, height, width)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels


def _ensure_file(spec: DatasetSpec, folder: Path, filename: str) -> Path:
    """Return folder/filename, downloading it first if it is not there."""
    path = folder / filename
    if not path.exists():
        _fetch(spec, filename, path, missing=path, what="the four IDX files")
    return path


def _ensure_cifar_files(spec: DatasetSpec, data_dir: Path) -> Path:
    """Return the batch folder; if a file is missing, fetch the archive and extract it."""
    folder = data_dir / spec.folder
    names = [name for names in CIFAR_SPLIT_FILES.values() for name in names]
    missing = [name for name in names if not (folder / name).exists()]
    if missing:
        archive = data_dir / CIFAR_ARCHIVE
        what = f"the six batch files (extracted from {CIFAR_ARCHIVE})"
        _fetch(spec, CIFAR_ARCHIVE, archive, missing=folder / missing[0], what=what)
        try:
            _extract(archive, data_dir, [f"{spec.folder}/{name}" for name in missing])
        finally:
            archive.unlink()
    return folder


def _fetch(spec: DatasetSpec, filename: str, dest: Path, missing: Path, what: str) -> None:
    """Download base_url/filename to dest; on failure, say which file is missing and why."""
    url = spec.base_url.rstrip("/") + "/" + filename
    try:
        _download(url, dest, spec.md5[filename])
    except (OSError, http.client.HTTPException) as e:
        raise DatasetError(
            f"{missing.name} is missing: looked for {missing}, and the download from {url} failed "
            f"({e}). Put {what} of {spec.name!r} in {missing.parent}, or set FL_APP_DATA_DIR / "
            f"dataset.data_dir to a folder holding a {spec.folder}/ sub-folder with them."
        ) from e


def _extract(archive: Path, dest: Path, names: list[str]) -> None:
    """Extract exactly the regular-file members `names` under dest.

    Only paths we built are written, so a crafted member name or link in the
    archive cannot place anything outside dest.
    """
    wanted = set(names)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    with _atomic_file(dest / member.name) as out:
                        shutil.copyfileobj(tar.extractfile(member), out)
                    wanted.remove(member.name)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{archive}: extraction failed (corrupt or truncated?): {e}") from e
    if wanted:
        raise DatasetError(f"{archive}: lacks the file(s) {', '.join(sorted(wanted))}")


@contextlib.contextmanager
def _atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """Yield a temporary file beside dest that becomes dest only if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(url: str, dest: Path, expected_md5: str) -> None:
    """Fetch url to dest atomically: only a file with the expected md5 ever appears at dest."""
    log.info("Downloading %s to %s", url, dest)
    md5 = hashlib.md5()
    with (
        _atomic_file(dest) as out,
        urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp,
    ):
        while chunk := resp.read(1 << 20):
            md5.update(chunk)
            out.write(chunk)
        if md5.hexdigest() != expected_md5:
            raise DatasetError(
                f"checksum mismatch for {url}: expected md5 {expected_md5}, got {md5.hexdigest()}"
            )
