"""Tests for fl_app.data on the real MNIST / Fashion-MNIST files, small IDX files
broken on purpose, and downloads from a real local HTTP server."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import os
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from fl_app.data import (
    DATASET_FOLDERS,
    DATASETS,
    SPLIT_FILES,
    DatasetError,
    load_dataset,
    load_idx_dataset,
    scale_images,
)

DATA_ROOT = Path(os.environ["FL_APP_DATA_DIR"])  # set by conftest.py
TRAIN_IMAGES, TRAIN_LABELS = SPLIT_FILES["train"]
TEST_IMAGES, TEST_LABELS = SPLIT_FILES["test"]
ALL_FILES = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS]


# ---------- helpers: small valid IDX files ----------


def idx_images(n: int = 5, rows: int = 28, cols: int = 28, magic: int = 2051) -> bytes:
    pixels = (np.arange(n * rows * cols) % 256).astype(np.uint8)
    return struct.pack(">IIII", magic, n, rows, cols) + pixels.tobytes()


def idx_labels(labels=(0, 1, 2, 3, 9), magic: int = 2049) -> bytes:
    return struct.pack(">II", magic, len(labels)) + bytes(labels)


def small_files() -> dict[str, bytes]:
    """Gzipped contents of a valid 5-image train split and 5-image test split."""
    return {
        TRAIN_IMAGES: gzip.compress(idx_images()),
        TRAIN_LABELS: gzip.compress(idx_labels()),
        TEST_IMAGES: gzip.compress(idx_images()),
        TEST_LABELS: gzip.compress(idx_labels()),
    }


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)


def md5s(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.md5(content).hexdigest() for name, content in files.items()}


# ---------- real data ----------


def real_root(name: str) -> Path:
    """The real data root; fail (never skip) when the files are not there."""
    folder = DATA_ROOT / DATASET_FOLDERS[name]
    missing = [f for f in ALL_FILES if not (folder / f).is_file()]
    if missing:
        pytest.fail(
            f"real {name} files missing from {folder}: {missing}. "
            "Set FL_APP_DATA_DIR to a folder holding mnist/ and fashion-mnist/."
        )
    return DATA_ROOT


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", real_root("mnist"))


def test_mnist_loads(mnist):
    x_train, y_train, x_test, y_test = mnist
    assert x_train.shape == (60000, 28, 28) and y_train.shape == (60000,)
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    for a in mnist:
        assert a.dtype == np.uint8
    assert y_train.max() <= 9 and y_test.max() <= 9
    counts = np.bincount(y_train, minlength=10)
    assert counts[:2].tolist() == [5923, 6742]
    assert counts.sum() == 60000


def test_fashion_mnist_loads():
    x_train, y_train, x_test, y_test = load_dataset("fashion_mnist", real_root("fashion_mnist"))
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert np.bincount(y_train, minlength=10).tolist() == [6000] * 10
    assert len(y_test) == 10000 and y_test.max() <= 9


def test_scale_images(mnist):
    scaled = scale_images(mnist[2])
    assert scaled.dtype == np.float32
    assert scaled.shape == (10000, 28, 28, 1)
    assert scaled.min() >= 0.0 and scaled.max() <= 1.0
    assert scaled.max() == 1.0  # 255 maps to exactly 1


def test_scale_images_rejects_wrong_input():
    with pytest.raises(DatasetError, match="uint8"):
        scale_images(np.zeros((2, 28, 28), np.float32))


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", tmp_path)
    assert "mnist" in str(e.value) and "fashion_mnist" in str(e.value)


# ---------- local files ----------


def test_local_files_are_not_md5_checked(tmp_path):
    """User-supplied files with non-canonical md5s load; no download is attempted."""
    write_files(tmp_path / "mnist", small_files())
    x_train, y_train, x_test, y_test = load_dataset("mnist", tmp_path)
    assert x_train.shape == (5, 28, 28) and x_train.dtype == np.uint8
    assert y_train.tolist() == [0, 1, 2, 3, 9]
    assert x_test.shape == (5, 28, 28) and y_test.dtype == np.uint8


BAD_FILES = {
    "not gzip": (TRAIN_IMAGES, b"this is not a gzip file", "not a valid gzip"),
    "truncated gzip": (TRAIN_LABELS, gzip.compress(idx_labels())[:-12], "not a valid gzip"),
    "truncated header": (TEST_IMAGES, gzip.compress(idx_images()[:10]), "truncated"),
    "truncated payload": (TRAIN_IMAGES, gzip.compress(idx_images()[:-10]), "truncated"),
    "wrong magic": (
        TRAIN_LABELS, gzip.compress(idx_labels(magic=2051)), "expected 2049, found 2051"
    ),
    "wrong dims": (TEST_IMAGES, gzip.compress(idx_images(rows=27)), "27x28"),
    "label 10": (TEST_LABELS, gzip.compress(idx_labels((0, 1, 10, 3, 4))), "found 10 at index 2"),
}


@pytest.mark.parametrize("filename, content, fragment", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_names_file_and_problem(tmp_path, filename, content, fragment):
    write_files(tmp_path / "mnist", {**small_files(), filename: content})
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", tmp_path)
    assert filename in str(e.value)
    assert fragment in str(e.value)


def test_count_mismatch_names_both_files(tmp_path):
    four_labels = gzip.compress(idx_labels((1, 2, 3, 4)))
    write_files(tmp_path / "mnist", {**small_files(), TRAIN_LABELS: four_labels})
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", tmp_path)
    assert TRAIN_IMAGES in str(e.value) and TRAIN_LABELS in str(e.value)
    assert "5 images" in str(e.value) and "4 labels" in str(e.value)


# ---------- downloads from a real local HTTP server ----------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def server(tmp_path_factory, monkeypatch):
    """Serve a folder of small valid IDX files on 127.0.0.1; yields (base_url, files)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    served = tmp_path_factory.mktemp("served")
    files = small_files()
    write_files(served, files)
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served))
    )
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", files
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_missing_files_are_downloaded_and_verified(tmp_path, server, caplog):
    base_url, files = server
    spec = dataclasses.replace(DATASETS["mnist"], base_url=base_url, md5=md5s(files))
    # One file already present: only the other three are fetched.
    write_files(tmp_path / "mnist", {TRAIN_IMAGES: files[TRAIN_IMAGES]})
    with caplog.at_level("INFO", logger="fl_app.data"):
        x_train, y_train, x_test, y_test = load_idx_dataset(spec, tmp_path)
    assert x_train.shape == (5, 28, 28) and y_test.tolist() == [0, 1, 2, 3, 9]
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(ALL_FILES)
    for name in ALL_FILES:
        assert (tmp_path / "mnist" / name).read_bytes() == files[name]
    downloaded = [r.getMessage() for r in caplog.records if "Downloading" in r.getMessage()]
    assert len(downloaded) == 3 and not any(TRAIN_IMAGES in m for m in downloaded)


def test_checksum_mismatch_leaves_no_file(tmp_path, server):
    base_url, files = server
    wrong = {**md5s(files), TRAIN_LABELS: "0" * 32}
    spec = dataclasses.replace(DATASETS["mnist"], base_url=base_url, md5=wrong)
    with pytest.raises(DatasetError) as e:
        load_idx_dataset(spec, tmp_path)
    message = str(e.value)
    assert base_url + TRAIN_LABELS in message
    assert "0" * 32 in message and md5s(files)[TRAIN_LABELS] in message
    # Only the verified train-images file is kept: no bad file, no temp file.
    assert [p.name for p in (tmp_path / "mnist").iterdir()] == [TRAIN_IMAGES]


def test_unreachable_server_names_missing_file(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    spec = dataclasses.replace(DATASETS["mnist"], base_url=f"http://127.0.0.1:{port}/")
    with pytest.raises(DatasetError) as e:
        load_idx_dataset(spec, tmp_path)
    message = str(e.value)
    assert TRAIN_IMAGES in message and str(tmp_path / "mnist") in message
    assert f"http://127.0.0.1:{port}/{TRAIN_IMAGES}" in message
    assert "FL_APP_DATA_DIR" in message
    assert list((tmp_path / "mnist").iterdir()) == []
