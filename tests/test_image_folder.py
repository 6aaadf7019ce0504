"""A party's own image folder: conversion to the model's input, and every kind of bad folder."""

import re
import shutil

import numpy as np
import pytest
from conftest import mnist_task, write_image_folder

from fl_app.client_app import load_node_data
from fl_app.config import compose_config
from fl_app.data import DatasetError, class_names, load_dataset
from fl_app.image_folder import check_readable, list_images, load_image_folder
from fl_app.partition import load_own_images

MNIST_CLASSES = class_names("mnist")


@pytest.fixture(scope="module")
def digits(data_root):
    x, y = load_dataset("mnist", data_root)[2:]
    return x[:40], y[:40]


def test_images_of_any_size_and_colour_become_model_input(tmp_path, digits):
    x, y = digits
    write_image_folder(tmp_path / "grey", x, y)
    write_image_folder(tmp_path / "colour", x, y, size=(64, 48), mode="RGB", suffix=".jpg")

    images, labels = load_image_folder(tmp_path / "grey", MNIST_CLASSES, (28, 28, 1))
    order = np.lexsort((np.arange(len(y)), y))  # files are read class by class
    assert images.dtype == np.uint8 and images.shape == (40, 28, 28, 1)
    np.testing.assert_array_equal(np.sort(labels), np.sort(y))
    assert np.array_equal(images, x[order])  # PNG round trip is lossless

    colour, colour_labels = load_image_folder(tmp_path / "colour", MNIST_CLASSES, (28, 28, 1))
    assert colour.shape == (40, 28, 28, 1)
    np.testing.assert_array_equal(colour_labels, labels)
    # Resized and JPEG-compressed, then brought back: close to the originals, not equal.
    assert np.abs(colour.astype(int) - x[order].astype(int)).mean() < 20

    rgb, _ = load_image_folder(tmp_path / "grey", MNIST_CLASSES, (32, 32, 3))
    assert rgb.shape == (40, 32, 32, 3)


def test_other_files_and_hidden_entries_are_ignored(tmp_path, digits):
    root = write_image_folder(tmp_path / "own", *digits)
    (root / "README.txt").write_text("about these images")
    (root / "3" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    assert len(load_image_folder(root, MNIST_CLASSES, (28, 28, 1))[1]) == 40


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda root: (root / "cats").mkdir(), "unknown class folder(s) cats"),
        (lambda root: (root / "2" / "broken.png").write_bytes(b"\x89PNG not really"),
         "broken.png: cannot be read as an image"),
    ],
    ids=["unknown class", "unreadable image"],
)
def test_bad_folders_say_what_and_where(tmp_path, digits, damage, fragment):
    root = write_image_folder(tmp_path / "own", *digits)
    damage(root)
    with pytest.raises(DatasetError, match=re.escape(fragment)) as err:
        load_image_folder(root, MNIST_CLASSES, (28, 28, 1))
    assert str(root) in str(err.value)


def test_of_several_unreadable_images_the_first_in_order_is_named(tmp_path, digits):
    root = write_image_folder(tmp_path / "own", *digits)
    for name in ("7/a.png", "1/zz.png", "1/b.png", "9/c.png"):  # read class by class, by name
        (root / name).write_bytes(b"torn")
    files = [path for path, _ in list_images(root, MNIST_CLASSES)]
    for load in (lambda: load_image_folder(root, MNIST_CLASSES, (28, 28, 1)), lambda: check_readable(files)):
        with pytest.raises(DatasetError, match=re.escape(f"{root / '1' / 'b.png'}: cannot be read")):
            load()


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", MNIST_CLASSES, (28, 28, 1))
    for name in MNIST_CLASSES:
        (tmp_path / "empty" / name).mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        load_image_folder(tmp_path / "empty", MNIST_CLASSES, (28, 28, 1))


def test_class_set_of_another_dataset_is_refused(tmp_path, digits):
    root = write_image_folder(tmp_path / "own", *digits)
    with pytest.raises(DatasetError, match="unknown class folder.*airplane, automobile"):
        load_image_folder(root, class_names("cifar10"), (32, 32, 3))


def test_a_class_a_party_does_not_hold_needs_no_folder(tmp_path, digits):
    root = write_image_folder(tmp_path / "own", *digits)
    held = len(list((root / "7").iterdir()))
    shutil.rmtree(root / "7")
    images, labels = load_image_folder(root, MNIST_CLASSES, (28, 28, 1))
    assert len(labels) == 40 - held and 7 not in labels and labels.max() == 9


def test_own_images_are_split_into_train_and_held_out(tmp_path, digits, data_root):
    root = write_image_folder(tmp_path / "own", *digits)
    data = load_own_images(str(root), mnist_task(data_root), 0.25, 7)
    assert (len(data.y_train), len(data.y_val)) == (30, 10)
    assert data.x_train.dtype == np.float32 and data.x_train.max() <= 1.0
    np.testing.assert_array_equal(np.sort(np.concatenate([data.y_train, data.y_val])), np.sort(digits[1]))

    one = tmp_path / "one"
    write_image_folder(one, *(a[:1] for a in digits))
    with pytest.raises(DatasetError, match="too few for a training and a held-out part"):
        load_own_images(str(one), mnist_task(data_root), 0.9, 7)


def test_a_node_config_that_names_no_data_says_how_to(data_root):
    with pytest.raises(DatasetError, match="names no local data"):
        load_node_data({"foo": 1}, compose_config())
    with pytest.raises(DatasetError, match="outside 0..1"):
        load_node_data({"partition-id": 2, "num-partitions": 2}, compose_config())
