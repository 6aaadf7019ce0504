"""Pretrained backbones (keras.applications): starting weights from a file, a frozen backbone
whose head alone trains and travels, features computed once, and warm starts from an earlier
run's model (init_from). The ImageNet download is Keras' own; here the tests write their own
weights files."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import OWN_CLASSES, read_history, run_simulation_cli, write_own_task

from fl_app import model as keras_model
from fl_app.client_app import KerasClient, WorkerModel
from fl_app.config import compose_config
from fl_app.config_schema import ConfigError
from fl_app.partition import ClientData

SHAPE = (32, 32, 3)
LOSS = "sparse_categorical_crossentropy"


def small_images(count=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8), rng.integers(0, 3, count)


def frozen_worker(seed=0) -> WorkerModel:
    model = keras_model.build_model("mobilenet_v3_small", SHAPE, 3, "adam", LOSS, 1e-3, frozen=True, seed=seed)
    return WorkerModel(model, True, *keras_model.head_on_features(model, "adam", LOSS),
                       keras_model.frozen_digest(model))


def client(worker, name="a"):
    images, labels = small_images()
    data = ClientData(images, labels, np.arange(36), np.arange(36, 48))
    cfg = compose_config(["dataset=cifar10", "model=mobilenet_v3_small", "model.train=head", "eval_batch_size=16"])
    return KerasClient(worker, data, name, None, cfg)


def test_a_frozen_backbone_sends_only_its_head_and_never_changes():
    worker = frozen_worker()
    frozen_before = [w.numpy().copy() for w in worker.model.non_trainable_weights]
    party = client(worker)
    sent = party.get_parameters({})
    head = worker.model.get_layer(keras_model.HEAD)
    assert [a.shape for a in sent] == [(576, 3), (3,)] and len(worker.model.trainable_weights) == 2
    arrays, _, metrics = party.fit(sent, {"server_round": 1, "local_epochs": 2, "batch_size": 8,
                                          "learning_rate": 0.01})
    assert all(np.array_equal(a, b) for a, b in zip(arrays, head.get_weights()))
    assert not np.allclose(arrays[0], sent[0])  # the head trained
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(frozen_before, worker.model.non_trainable_weights))
    assert metrics["frozen_digest"] == keras_model.frozen_digest(worker.model)
    loss, count, evaluation = party.evaluate(arrays, {})
    assert count == 12 and 0 <= evaluation["accuracy"] <= 1 and np.isfinite(loss)


def test_the_head_trained_on_features_computed_once_is_the_head_trained_on_images():
    images, labels = small_images()
    x = images.astype(np.float32) / 255
    on_features = frozen_worker()
    features = keras_model.features(on_features.backbone, x, 16)
    keras_model.train(on_features.head, features, labels, epochs=2, batch_size=8, learning_rate=0.01, seed=3)
    on_images = frozen_worker()
    keras_model.train(on_images.model, x, labels, epochs=2, batch_size=8, learning_rate=0.01, seed=3)
    for a, b in zip(keras_model.exchanged_weights(on_features.model, True),
                    keras_model.exchanged_weights(on_images.model, True)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_weights_file_starts_the_backbone_and_one_that_does_not_fit_is_refused(tmp_path):
    keras.utils.set_random_seed(1)
    pretrained = keras.applications.MobileNetV3Small(input_shape=SHAPE, include_top=False, weights=None,
                                                     pooling="avg")
    path = tmp_path / "backbone.weights.h5"
    pretrained.save_weights(path)
    model = keras_model.build_network("mobilenet_v3_small", SHAPE, 3, weights=str(path), frozen=True)
    backbone = model.layers[2]
    assert all(np.array_equal(a, b) for a, b in zip(backbone.get_weights(), pretrained.get_weights()))
    keras.applications.EfficientNetB0(input_shape=SHAPE, include_top=False, weights=None,
                                      pooling="avg").save_weights(tmp_path / "other.weights.h5")
    with pytest.raises(ConfigError, match=r"does not fit mobilenet_v3_small on 32x32x3 images: .*name=conv.*"
                                          r"variable.shape=\(3, 3, 3, 16\), Received: value.shape=\(3, 3, 3, 32\)") as err:
        keras_model.build_network("mobilenet_v3_small", SHAPE, 3, weights=str(tmp_path / "other.weights.h5"))
    assert err.value.key == "model.weights"


def test_init_from_continues_an_earlier_model_or_reuses_it_under_a_new_head(tmp_path):
    keras.utils.set_random_seed(2)
    earlier = keras_model.build_network("seed_cnn", (28, 28, 1), 10)
    earlier.save(tmp_path / "model.keras")
    same = keras_model.build_network("seed_cnn", (28, 28, 1), 10, init_from=str(tmp_path / "model.keras"))
    assert all(np.array_equal(a, b) for a, b in zip(same.get_weights(), earlier.get_weights()))
    keras.utils.set_random_seed(3)
    other_classes = keras_model.build_network("seed_cnn", (28, 28, 1), 4, init_from=str(tmp_path / "model.keras"))
    new, old = other_classes.get_weights(), earlier.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(new[:-2], old[:-2])) and new[-1].shape == (4,)
    with pytest.raises(ConfigError, match=re.escape("takes 28x28x1 images, the task's are 32x32x1")):
        keras_model.build_network("seed_cnn", (32, 32, 1), 10, init_from=str(tmp_path / "model.keras"))
    with pytest.raises(ConfigError, match="whose weights do not fit mcmahan_2nn"):
        keras_model.build_network("mcmahan_2nn", (28, 28, 1), 10, init_from=str(tmp_path / "model.keras"))


def test_imagenet_weights_that_cannot_be_downloaded_are_refused_naming_the_key(tmp_path):
    # A real download that fails: Keras' home is empty and HTTPS goes to a closed local port.
    build = ("from fl_app.model import build_network\n"
             "build_network('mobilenet_v3_small', (32, 32, 3), 3, weights='imagenet')")
    env = {**os.environ, "KERAS_HOME": str(tmp_path), "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    result = subprocess.run([sys.executable, "-c", build], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert ("ConfigError: Invalid config key 'model.weights': imagenet: Keras could not download "
            "mobilenet_v3_small's ImageNet weights (URL fetch failure") in result.stderr
    assert "give its path as model.weights" in result.stderr


@pytest.mark.parametrize("overrides, key, fragment", [
    (["model.train=head"], "model.train", "seed_cnn has no pretrained backbone to freeze"),
    (["model.weights=imagenet"], "model.weights", "seed_cnn has no pretrained backbone"),
    (["model=mobilenet_v3_small"], "model.name", "takes images of at least 32x32; the mnist task's are 28x28"),
    (["model=efficientnet_b0", "model.weights=imagenet", "dataset=image_folder", "dataset.train_dir=x",
      "dataset.classes=[a,b]", "dataset.channels=1", "mode=deployment", "dataset.train_dir=null"],
     "model.weights", "set dataset.channels=3"),
    (["model=efficientnet_b0", "model.weights=/no/such.weights.h5", "dataset=cifar10"], "model.weights",
     "no such file"),
    (["init_from=/no/model.keras"], "init_from", "no such file"),
    (["model=mobilenet_v3_small", "model.train=head", "augment=light", "dataset=cifar10"], "augment",
     "computes its images' features once"),
    (["model=mobilenet_v3_small", "model.train=frozen", "dataset=cifar10"], "model.train", "all, head"),
])
def test_bad_starting_points_are_refused_before_training(overrides, key, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)) as err:
        compose_config(overrides)
    assert err.value.key == key


@pytest.mark.slow
def test_a_frozen_mobilenet_from_a_weights_file_trains_its_head_in_a_real_simulation(tmp_path, data_root):
    clients = write_own_task(tmp_path / "task", data_root) / "clients"
    keras.utils.set_random_seed(4)
    weights = tmp_path / "backbone.weights.h5"
    keras.applications.MobileNetV3Small(input_shape=(64, 64, 3), include_top=False, weights=None,
                                        pooling="avg").save_weights(weights)
    run = tmp_path / "run"
    result = run_simulation_cli("dataset=image_folder", f"dataset.clients_dir={clients}", "model=mobilenet_v3_small",
                                f"model.weights={weights}", "model.train=head", "num_rounds=2", "local_epochs=3",
                                "learning_rate=0.01", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    history = read_history(run)
    head_bytes = (576 * len(OWN_CLASSES) + len(OWN_CLASSES)) * 4
    assert [r["bytes_per_client"] for r in history] == [head_bytes, head_bytes]
    # A random frozen backbone's features teach the head little: what is checked is the exchange.
    assert all(r["clients_succeeded"] == 3 and 0 <= r["eval_accuracy"] <= 1 for r in history)
    assert f"the head's {head_bytes // 4:,} (0.01 MB) to and from each client a round" in result.stdout
    saved = keras.models.load_model(run / "model.keras", compile=False)
    assert saved.output_shape[-1] == len(OWN_CLASSES) and saved.input_shape[1:] == (64, 64, 3)
