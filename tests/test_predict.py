"""`python -m fl_app.predict`: a real Keras model classifying image files the test writes."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import predict, write_image_folder
from PIL import Image

from fl_app.data import class_names, load_dataset, scale_images
from fl_app.model import build_model

MNIST = class_names("mnist")


@pytest.fixture(scope="module")
def digits(data_root):
    """The first 12 MNIST test images and labels, uint8 (N, 28, 28, 1)."""
    x_test, y_test = load_dataset("mnist", data_root)[2:]
    return x_test[:12], y_test[:12]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """(model.keras, the model): the 2NN after one epoch on 5,000 MNIST images, saved."""
    x_train, y_train = load_dataset("mnist", data_root)[:2]
    keras.utils.set_random_seed(0)
    model = build_model("mcmahan_2nn", (28, 28, 1), 10, "adam", "sparse_categorical_crossentropy", 0.002)
    model.fit(scale_images(x_train[:5000]), y_train[:5000], epochs=1, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path, model


def test_classifies_a_folder_and_a_colour_image_skipping_a_corrupt_one(tmp_path, capsys, trained, digits):
    model_file, model = trained
    x, y = digits
    folder = write_image_folder(tmp_path / "scans", x[:10], y[:10])  # scans/<label>/<i>.png
    (folder / "3" / "torn.png").write_bytes(b"\x89PNG torn off")
    photo = tmp_path / "photo.jpg"  # image 0 in colour, 70x70
    Image.fromarray(x[0, ..., 0]).convert("RGB").resize((70, 70)).save(photo)
    output = tmp_path / "out.csv"

    code, out, err = predict(capsys, model_file, folder, photo, tmp_path / "gone.png",
                             "--dataset", "mnist", "-o", output)

    assert code == 1  # not every image was classified
    assert f"predict: skipped {folder / '3' / 'torn.png'}: cannot be read as an image" in err
    assert f"predict: skipped {tmp_path / 'gone.png'}: no such file or directory" in err
    assert f"11 image(s) classified, written to {output}; 2 skipped" in out
    rows = list(csv.DictReader(output.open()))
    assert [row["file"] for row in rows] == [*map(str, sorted(folder.rglob("0*.png"))), str(photo)]
    assert all(row["file"] in out for row in rows)
    # The PNGs are lossless: their rows are the model's own output for the original arrays.
    probabilities = model.predict(scale_images(x), verbose=0)
    for row in rows[:-1]:
        p = probabilities[int(Path(row["file"]).stem)]  # files are named by their index
        best = np.argsort(p)[::-1][:3]
        assert row["predicted"] == MNIST[best[0]]
        assert float(row["confidence"]) == pytest.approx(p[best[0]], abs=1e-4)
        top3 = [entry.split(":") for entry in row["top3"].split()]
        assert [name for name, _ in top3] == [MNIST[k] for k in best]
        assert [float(value) for _, value in top3] == pytest.approx(p[best], abs=1e-4)
    # The colour photo, resized back to 28x28 grey, is still image 0's digit.
    assert rows[-1]["predicted"] == MNIST[y[0]] == MNIST[probabilities[0].argmax()]


def test_split_prints_the_accuracy_on_the_test_set(capsys, trained, data_root):
    model_file, model = trained
    code, out, _ = predict(capsys, model_file, "--dataset", "mnist", "--split", "test",
                           "--data-dir", data_root)
    x_test, y_test = load_dataset("mnist", data_root)[2:]
    accuracy = np.mean(model.predict(scale_images(x_test), batch_size=1000, verbose=0).argmax(axis=1) == y_test)
    assert code == 0 and accuracy > 0.85
    assert f"accuracy {accuracy:.4f} on the 10,000 test images of mnist" in out


def _digit(tmp_path, digits):
    path = tmp_path / "digit.png"
    Image.fromarray(digits[0][0, ..., 0]).save(path)
    return path


@pytest.mark.parametrize(
    "make_args, fragment",
    [
        (lambda tmp, model, image: [tmp / "none.keras", image, "--dataset", "mnist"],
         "none.keras: no such model file"),
        (lambda tmp, model, image: [image, image, "--dataset", "mnist"],
         "digit.png: not a Keras model file"),
        (lambda tmp, model, image: [tmp / "torn.keras", image, "--dataset", "mnist"],
         "torn.keras: not a Keras model: a .keras file is a zip archive"),
        (lambda tmp, model, image: [model, image, "--dataset", "cifar10"],
         "takes input (28, 28, 1) and gives 10 outputs, but cifar10 images are (32, 32, 3)"),
        (lambda tmp, model, image: [model, image],
         "name the model's dataset with --dataset: "),
        (lambda tmp, model, image: [model, tmp / "empty.png", "--dataset", "mnist"],
         "no image could be read: nothing classified"),
    ],
    ids=["missing model", "not a model", "corrupt model", "shape does not fit", "dataset unknown",
         "no readable image"],
)
def test_bad_input_says_what_and_where(tmp_path, capsys, trained, digits, make_args, fragment):
    (tmp_path / "torn.keras").write_bytes(b"PK half a zip")
    (tmp_path / "empty.png").write_bytes(b"")
    code, _, err = predict(capsys, *make_args(tmp_path, trained[0], _digit(tmp_path, digits)))
    assert code == 1 and fragment in err


def test_help_and_the_command_line_with_the_dataset_of_the_run(tmp_path, capsys, trained, digits):
    code, out, _ = predict(capsys, "--help")
    assert code == 0 and "examples:" in out and "--split" in out
    assert predict(capsys, trained[0])[0] == 2  # neither IMAGES nor --split

    run = tmp_path / "run"  # a run's model.keras beside its config.yaml, which names the dataset
    run.mkdir()
    shutil.copy(trained[0], run / "model.keras")
    (run / "config.yaml").write_text("dataset:\n  name: fashion_mnist\n")
    result = subprocess.run(  # the run's directory stands for its model.keras
        [sys.executable, "-m", "fl_app.predict", run, _digit(tmp_path, digits)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = csv.DictReader((tmp_path / "predictions.csv").open())
    assert row["predicted"] in class_names("fashion_mnist") and "Traceback" not in result.stderr
    assert "absl" not in result.stderr  # TensorFlow's start-up lines are kept out of the console
    code, _, err = predict(capsys, tmp_path, "x.png")
    assert code == 1 and err == f"predict: {tmp_path}: no model.keras in this directory (a run writes it when it ends)\n"
