"""Tests for fl_app.data on the real MNIST / Fashion-MNIST files, small IDX and
CIFAR-format files (some broken on purpose), and downloads from a real local HTTP server."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

from fl_app.data import (
    CIFAR_ARCHIVE,
    CIFAR_SPLIT_FILES,
    DATASET_FOLDERS,
    DATASETS,
    SPLIT_FILES,
    DatasetError,
    DatasetSpec,
    image_shape,
    load_cifar_dataset,
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


# ---------- helpers: small CIFAR-format files ----------

CIFAR_FOLDER = DATASET_FOLDERS["cifar10"]
CIFAR_FILES = [name for names in CIFAR_SPLIT_FILES.values() for name in names]


def cifar_batch(seed: int, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images (n, 32, 32, 3) and labels (n,)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), np.uint8), rng.integers(0, 10, n, np.uint8)


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR binary records: a label byte, then the red, green and blue 32x32 planes."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.column_stack([labels, planes]).astype(np.uint8).tobytes()


def cifar_batches() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: cifar_batch(seed) for seed, name in enumerate(CIFAR_FILES)}


def cifar_files(batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, bytes]:
    return {name: cifar_bytes(*batch) for name, batch in batches.items()}


def tar_gz(files: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    """A tar.gz of regular files (name -> content) and of links to /etc/passwd."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name in symlinks:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def cifar_archive(files: dict[str, bytes], **extra: bytes) -> bytes:
    """The archive layout of cifar-10-binary.tar.gz, plus `extra` members by full name."""
    return tar_gz({**{f"{CIFAR_FOLDER}/{name}": data for name, data in files.items()}, **extra})


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
    assert x_train.shape == (60000, 28, 28, 1) and y_train.shape == (60000,)
    assert x_test.shape == (10000, 28, 28, 1) and y_test.shape == (10000,)
    for a in mnist:
        assert a.dtype == np.uint8
    assert y_train.max() <= 9 and y_test.max() <= 9
    counts = np.bincount(y_train, minlength=10)
    assert counts[:2].tolist() == [5923, 6742]
    assert counts.sum() == 60000


def test_fashion_mnist_loads():
    x_train, y_train, x_test, y_test = load_dataset("fashion_mnist", real_root("fashion_mnist"))
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(y_train, minlength=10).tolist() == [6000] * 10
    assert len(y_test) == 10000 and y_test.max() <= 9


def test_scale_images(mnist):
    scaled = scale_images(mnist[2])
    assert scaled.dtype == np.float32
    assert scaled.shape == (10000, 28, 28, 1)
    assert scaled.min() >= 0.0 and scaled.max() <= 1.0
    assert scaled.max() == 1.0  # 255 maps to exactly 1


def test_scale_images_keeps_any_shape():
    scaled = scale_images(np.array([0, 51, 255], np.uint8).reshape(1, 1, 1, 3))
    assert scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled, np.float32([0, 0.2, 1]).reshape(1, 1, 1, 3))


WRONG_IMAGES = {
    "float32": np.zeros((2, 28, 28, 1), np.float32),
    "3-d": np.zeros((2, 28, 28), np.uint8),
}


@pytest.mark.parametrize("images", WRONG_IMAGES.values(), ids=WRONG_IMAGES.keys())
def test_scale_images_rejects_wrong_input(images):
    with pytest.raises(DatasetError, match="uint8"):
        scale_images(images)


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar100", tmp_path)
    assert all(name in str(e.value) for name in ("mnist", "fashion_mnist", "cifar10"))


def test_image_shape():
    assert image_shape("mnist") == image_shape("fashion_mnist") == (28, 28, 1)
    assert image_shape("cifar10") == (32, 32, 3)
    with pytest.raises(DatasetError, match="known datasets"):
        image_shape("cifar100")


# ---------- local files ----------


def test_local_files_are_not_md5_checked(tmp_path):
    """User-supplied files with non-canonical md5s load; no download is attempted."""
    write_files(tmp_path / "mnist", small_files())
    x_train, y_train, x_test, y_test = load_dataset("mnist", tmp_path)
    assert x_train.shape == (5, 28, 28, 1) and x_train.dtype == np.uint8
    assert y_train.tolist() == [0, 1, 2, 3, 9]
    assert x_test.shape == (5, 28, 28, 1) and y_test.dtype == np.uint8


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


def test_cifar_round_trip(tmp_path):
    batches = cifar_batches()
    write_files(tmp_path / CIFAR_FOLDER, cifar_files(batches))
    loaded = load_dataset("cifar10", tmp_path)
    expected = []
    for names in CIFAR_SPLIT_FILES.values():
        expected += [np.concatenate([batches[n][i] for n in names]) for i in (0, 1)]
    assert loaded[0].shape == (100, 32, 32, 3) and loaded[2].shape == (20, 32, 32, 3)
    for got, want in zip(loaded, expected, strict=True):
        assert got.dtype == np.uint8 and got.flags.writeable
        np.testing.assert_array_equal(got, want)


def test_cifar_byte_layout(tmp_path):
    """As documented: label byte, 1024 red, 1024 green, 1024 blue bytes, each row-major."""
    red = bytearray([10] * 1024)
    red[1 * 32 + 2] = 99  # row 1, column 2
    record = bytes([7]) + bytes(red) + bytes([20] * 1024) + bytes([30] * 1024)
    write_files(tmp_path / CIFAR_FOLDER, dict.fromkeys(CIFAR_FILES, record))
    _, _, x_test, y_test = load_dataset("cifar10", tmp_path)
    assert y_test.tolist() == [7]
    assert x_test[0, 0, 0].tolist() == [10, 20, 30]
    assert x_test[0, 1, 2].tolist() == [99, 20, 30] and x_test[0, 2, 1, 0] == 10


def _label_10_at_4() -> bytes:
    images, labels = cifar_batch(0)
    labels[4] = 10
    return cifar_bytes(images, labels)


BAD_CIFAR_FILES = {
    "truncated": (
        "data_batch_3.bin", cifar_bytes(*cifar_batch(0))[:-1], "not a multiple of the 3073-byte"
    ),
    "empty": ("test_batch.bin", b"", "empty file"),
    "label 10": ("data_batch_5.bin", _label_10_at_4(), "found 10 at index 4"),
}


@pytest.mark.parametrize(
    "filename, content, fragment", BAD_CIFAR_FILES.values(), ids=BAD_CIFAR_FILES.keys()
)
def test_bad_cifar_file_names_file_and_problem(tmp_path, filename, content, fragment):
    write_files(tmp_path / CIFAR_FOLDER, {**cifar_files(cifar_batches()), filename: content})
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", tmp_path)
    assert str(tmp_path / CIFAR_FOLDER / filename) in str(e.value)
    assert fragment in str(e.value)


# ---------- downloads from a real local HTTP server ----------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def serve(tmp_path_factory, monkeypatch):
    """serve(files) puts files (name -> content) on a real HTTP server on 127.0.0.1 and
    returns its base URL; the server stops when the test ends."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    running = []

    def start(files: dict[str, bytes]) -> str:
        served = tmp_path_factory.mktemp("served")
        write_files(served, files)
        httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served))
        )
        thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        running.append((httpd, thread))
        return f"http://127.0.0.1:{httpd.server_address[1]}/"

    yield start
    for httpd, thread in running:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server(serve):
    """Small valid IDX files on a local HTTP server: (base_url, files)."""
    files = small_files()
    return serve(files), files


def test_missing_files_are_downloaded_and_verified(tmp_path, server, caplog):
    base_url, files = server
    spec = dataclasses.replace(DATASETS["mnist"], base_url=base_url, md5=md5s(files))
    # One file already present: only the other three are fetched.
    write_files(tmp_path / "mnist", {TRAIN_IMAGES: files[TRAIN_IMAGES]})
    with caplog.at_level("INFO", logger="fl_app.data"):
        x_train, y_train, x_test, y_test = load_idx_dataset(spec, tmp_path)
    assert x_train.shape == (5, 28, 28, 1) and y_test.tolist() == [0, 1, 2, 3, 9]
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


def cifar_spec(base_url: str, archive: bytes) -> DatasetSpec:
    """The cifar10 spec pointed at a test server, with the md5 of the archive served there."""
    md5 = {CIFAR_ARCHIVE: hashlib.md5(archive).hexdigest()}
    return dataclasses.replace(DATASETS["cifar10"], base_url=base_url, md5=md5)


def test_cifar_download_extracts_only_the_missing_files(tmp_path, serve):
    batches = cifar_batches()
    files = cifar_files(batches)
    archive = cifar_archive(
        files, **{"../escape.bin": b"x", f"{CIFAR_FOLDER}/readme.html": b"<html/>"}
    )
    spec = cifar_spec(serve({CIFAR_ARCHIVE: archive}), archive)
    data_dir = tmp_path / "data"
    # A test batch already present is used as it is: only the five others are extracted.
    own_images, own_labels = cifar_batch(seed=99, n=3)
    write_files(data_dir / CIFAR_FOLDER, {"test_batch.bin": cifar_bytes(own_images, own_labels)})
    x_train, y_train, x_test, y_test = load_cifar_dataset(spec, data_dir)
    assert x_train.shape == (100, 32, 32, 3) and y_train.shape == (100,)
    np.testing.assert_array_equal(x_test, own_images)
    np.testing.assert_array_equal(y_test, own_labels)
    assert sorted(p.name for p in (data_dir / CIFAR_FOLDER).iterdir()) == sorted(CIFAR_FILES)
    for name in CIFAR_SPLIT_FILES["train"]:
        assert (data_dir / CIFAR_FOLDER / name).read_bytes() == files[name]
    assert [p.name for p in data_dir.iterdir()] == [CIFAR_FOLDER]  # the archive is removed
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # nothing escaped


BAD_ARCHIVES = {"member missing": (), "member is a link": (f"{CIFAR_FOLDER}/test_batch.bin",)}


@pytest.mark.parametrize("symlinks", BAD_ARCHIVES.values(), ids=BAD_ARCHIVES.keys())
def test_cifar_archive_without_a_file_is_reported(tmp_path, serve, symlinks):
    files = cifar_files(cifar_batches())
    del files["test_batch.bin"]
    archive = tar_gz({f"{CIFAR_FOLDER}/{n}": c for n, c in files.items()}, symlinks)
    with pytest.raises(DatasetError) as e:
        load_cifar_dataset(cifar_spec(serve({CIFAR_ARCHIVE: archive}), archive), tmp_path)
    assert str(tmp_path / CIFAR_ARCHIVE) in str(e.value)
    assert f"lacks the file(s) {CIFAR_FOLDER}/test_batch.bin" in str(e.value)
    assert not (tmp_path / CIFAR_ARCHIVE).exists()
    assert not (tmp_path / CIFAR_FOLDER / "test_batch.bin").exists()


def test_cifar_checksum_mismatch_leaves_nothing(tmp_path, serve):
    archive = cifar_archive(cifar_files(cifar_batches()))
    spec = dataclasses.replace(
        cifar_spec(serve({CIFAR_ARCHIVE: archive}), archive), md5={CIFAR_ARCHIVE: "0" * 32}
    )
    with pytest.raises(DatasetError, match="checksum mismatch") as e:
        load_cifar_dataset(spec, tmp_path)
    assert CIFAR_ARCHIVE in str(e.value)
    assert list(tmp_path.iterdir()) == []


# dataset -> (loader, first missing file, what is fetched for it)
UNREACHABLE = {
    "mnist": (load_idx_dataset, f"mnist/{TRAIN_IMAGES}", TRAIN_IMAGES),
    "cifar10": (load_cifar_dataset, f"{CIFAR_FOLDER}/data_batch_1.bin", CIFAR_ARCHIVE),
}


@pytest.mark.parametrize("name", UNREACHABLE)
def test_unreachable_server_names_missing_file(tmp_path, name):
    loader, missing, fetched = UNREACHABLE[name]
    port = free_port()  # nothing listens there
    spec = dataclasses.replace(DATASETS[name], base_url=f"http://127.0.0.1:{port}/")
    with pytest.raises(DatasetError) as e:
        loader(spec, tmp_path)
    message = str(e.value)
    assert str(tmp_path / missing) in message
    assert f"http://127.0.0.1:{port}/{fetched}" in message
    assert "FL_APP_DATA_DIR" in message
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
