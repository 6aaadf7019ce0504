"""The Keras models and how one party trains and evaluates them (no Flower here).

A model is built and compiled once per process and reused for every client that the
process serves: `train` resets the optimizer state first, so no client inherits another
client's momentum or Adam moments.
"""

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from fl_app.config_schema import ConfigError
from fl_app.library_patches import fuse_adam, initializer_seeds_from


def build_seed_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The seed notebook's CNN: 693,962 trainable parameters on 28x28x1 input, 10 classes."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ],
        name="seed_cnn",
    )


def build_mcmahan_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """McMahan et al. 2017's MNIST CNN: 1,663,370 parameters on 28x28x1 input."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Conv2D(32, (5, 5), padding="same", activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Conv2D(64, (5, 5), padding="same", activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ],
        name="mcmahan_cnn",
    )


def build_mcmahan_2nn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """McMahan et al. 2017's 2NN: two hidden layers of 200 ReLU units, 199,210 parameters."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(200, activation="relu"),
            keras.layers.Dense(200, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ],
        name="mcmahan_2nn",
    )


class ProximalModel(keras.Model):
    """FedProx's local objective (Li et al. 2020): loss + mu/2 * ||w - w_global||^2.

    Keras has no proximal term, so the wrapped model's training loss gets one; `train`
    sets the anchor (the global weights) and mu before every fit. Evaluation and the
    weights exchanged with the server are the wrapped model's own.
    """

    def __init__(self, inner: keras.Model) -> None:
        super().__init__(name=f"{inner.name}_proximal")
        self.inner = inner
        # A plain tuple of tf.Variables: Keras tracks only its own Variables, so these
        # never become model weights (and never travel to the server).
        self._proximal = (
            tf.Variable(0.0, trainable=False),
            [tf.Variable(w, trainable=False) for w in inner.trainable_weights],
        )

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def set_anchor(self, mu: float) -> None:
        """Pull the coming fit towards the current (global) weights with strength mu."""
        mu_var, anchors = self._proximal
        mu_var.assign(mu)
        for anchor, weight in zip(anchors, self.inner.trainable_weights):
            anchor.assign(weight)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        if not training:
            return loss
        mu, anchors = self._proximal
        distance = tf.add_n([
            tf.reduce_sum(tf.square(weight - anchor))
            for weight, anchor in zip(self.inner.trainable_weights, anchors)
        ])
        return loss + 0.5 * mu * distance


MODELS = {
    "seed_cnn": build_seed_cnn,
    "mcmahan_cnn": build_mcmahan_cnn,
    "mcmahan_2nn": build_mcmahan_2nn,
}
# Pretrained networks (keras.applications), used without their ImageNet classifier. Each
# brings its own input preprocessing and takes pixel values in [0, 255].
BACKBONES = {
    "mobilenet_v3_small": keras.applications.MobileNetV3Small,
    "efficientnet_b0": keras.applications.EfficientNetB0,
}
HEAD = "head"  # the name of a backbone model's classification layer
OPTIMIZERS = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}


def build_on_backbone(name: str, input_shape: tuple[int, int, int], num_classes: int,
                      weights: str | None, frozen: bool = False) -> keras.Model:
    """Keras' pretrained network `name` (`weights`: "imagenet", a weights file of it, or None
    for random) under a new softmax layer, `HEAD`, on its pooled features; `frozen`: the
    backbone does not train (and its batch normalisation runs in inference mode).

    fl_app scales images to [0, 1] (`data.scale_images`); a Rescaling layer brings them back
    to the [0, 255] that the backbone's own preprocessing expects."""
    backbone = BACKBONES[name](input_shape=input_shape, include_top=False, weights=weights, pooling="avg")
    backbone.trainable = not frozen
    inputs = keras.Input(shape=input_shape)
    features = backbone(keras.layers.Rescaling(255.0)(inputs), training=False if frozen else None)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name=HEAD)(features)
    return keras.Model(inputs, outputs, name=name)


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Within: the weights built are those of `seed` (if given), in any process and whatever
    its other threads draw from Python's `random` (fl_app.library_patches)."""
    if seed is None:
        yield
        return
    keras.utils.set_random_seed(seed)
    with initializer_seeds_from(seed):
        yield


def build_network(name: str, input_shape: tuple[int, int, int], num_classes: int,
                  weights: str | None = None, frozen: bool = False, init_from: str | None = None,
                  seed: int | None = None) -> keras.Model:
    """The uncompiled network of conf/model/<name>.yaml for the task's input and classes,
    started from an earlier run's model (`init_from`, see `start_from`) if given; the same
    `seed` builds the same weights, at the server and at every party."""
    with _seeded(seed):
        if name in BACKBONES:
            try:
                network = build_on_backbone(name, input_shape, num_classes, weights, frozen)
            except ValueError as err:  # Keras names the layer whose weights do not fit, and the shapes
                reason = " ".join(str(err).split("Target variable")[0].split())
                raise ConfigError("model.weights", f"{weights} does not fit {name} on "
                                  f"{'x'.join(map(str, input_shape))} images: {reason}") from None
            except Exception as err:  # Keras raises a bare Exception when its download fails
                if weights != "imagenet" or "URL fetch failure" not in str(err):
                    raise
                raise ConfigError("model.weights", f"imagenet: Keras could not download {name}'s ImageNet "
                                  f"weights ({err}). Without internet here, download that file elsewhere "
                                  "and give its path as model.weights") from None
        else:
            network = MODELS[name](input_shape, num_classes)
    if init_from:
        start_from(network, init_from)
    return network


def start_from(network: keras.Model, path: str) -> None:
    """Set `network`'s weights to those of the Keras model saved at `path` (a run's
    model.keras): all of them, or when its classes differ all but its classification layer's
    (the last kernel and bias), which keep their fresh values. Raises `ConfigError` naming
    `init_from` when the saved model takes other images or is another network."""
    try:
        earlier = keras.models.load_model(path, compile=False)
    except Exception as err:  # Keras raises ValueError, OSError, zip errors, ...
        raise ConfigError("init_from", f"{path} cannot be loaded as a Keras model: {err}") from None
    takes, wants = tuple(earlier.input_shape[1:]), tuple(network.input_shape[1:])
    if takes != wants:
        raise ConfigError("init_from", f"{path} takes {'x'.join(map(str, takes))} images, the task's are "
                          f"{'x'.join(map(str, wants))} (dataset.image_size, dataset.channels)")
    saved, fresh = earlier.get_weights(), network.get_weights()
    shared = len(fresh) if earlier.output_shape[-1] == network.output_shape[-1] else len(fresh) - 2
    if len(saved) != len(fresh) or any(a.shape != b.shape for a, b in zip(saved[:shared], fresh[:shared])):
        raise ConfigError("init_from", f"{path} is a {earlier.name} whose weights do not fit "
                          f"{network.name}: is model.name the earlier run's?")
    network.set_weights(saved[:shared] + fresh[shared:])


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    optimizer: str,
    loss: str,
    learning_rate: float,
    proximal: bool = False,
    steps_per_execution: int = 1,
    weights: str | None = None,
    frozen: bool = False,
    init_from: str | None = None,
    seed: int | None = None,
) -> keras.Model:
    """Build and compile a model from config names (see `conf/model`).

    proximal=True wraps it for FedProx (`ProximalModel`). steps_per_execution > 1 runs that
    many batches per TensorFlow call: the same steps and weights, less Python per batch.
    `weights` and `frozen`: a backbone model's starting weights, and whether only its head
    trains; `init_from`: an earlier run's model to start from.
    """
    model = build_network(name, input_shape, num_classes, weights, frozen, init_from, seed)
    if proximal:
        model = ProximalModel(model)
    compile_for_training(model, optimizer, loss, learning_rate, steps_per_execution)
    return model


def compile_for_training(model: keras.Model, optimizer: str, loss: str, learning_rate: float,
                         steps_per_execution: int) -> None:
    keras_optimizer = OPTIMIZERS[optimizer](learning_rate=learning_rate)
    if isinstance(keras_optimizer, keras.optimizers.Adam):
        fuse_adam(keras_optimizer)  # one TensorFlow kernel a weight (fl_app.library_patches)
    model.compile(
        optimizer=keras_optimizer,
        loss=loss,
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )


def summary_text(model: keras.Model) -> str:
    """Keras' summary (layers, output shapes, parameter counts) as text, for logs and files."""
    parts = []
    model.summary(print_fn=parts.append)
    return "\n".join(parts).rstrip()


def initial_weights(name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int, *,
                    weights: str | None = None, frozen: bool = False, init_from: str | None = None,
                    ) -> list[np.ndarray]:
    """The starting weights that travel (`exchanged_weights`), identical for a given seed."""
    return exchanged_weights(build_network(name, input_shape, num_classes, weights, frozen, init_from, seed), frozen)


def exchanged_weights(model: keras.Model, frozen: bool) -> list[np.ndarray]:
    """The weights that travel between clients and server: all of them, or with a frozen
    backbone only the trainable ones (the head's), the rest being the same everywhere."""
    return [w.numpy() for w in model.trainable_weights] if frozen else model.get_weights()


def set_exchanged_weights(model: keras.Model, arrays: list[np.ndarray], frozen: bool) -> None:
    if not frozen:
        model.set_weights(arrays)
        return
    for variable, array in zip(model.trainable_weights, arrays, strict=True):
        variable.assign(array)


def head_on_features(model: keras.Model, optimizer: str, loss: str, proximal: bool = False,
                     steps_per_execution: int = 1) -> tuple[keras.Model, keras.Model]:
    """(backbone, head) of a frozen backbone model: a model giving the backbone's features of
    images, and a compiled model that is the `HEAD` layer itself (the same weights) taking
    those features. Training the head on features computed once gives the weights that
    training the whole model would, without running the frozen backbone at every step."""
    network = model.inner if isinstance(model, ProximalModel) else model
    head_layer = network.get_layer(HEAD)
    backbone = keras.Model(network.inputs, head_layer.input)
    head = keras.Sequential([keras.Input(shape=head_layer.input.shape[1:]), head_layer])
    head = ProximalModel(head) if proximal else head
    compile_for_training(head, optimizer, loss, 1e-3, steps_per_execution)
    return backbone, head


def features(backbone: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The backbone's features of images `x`, batch by batch."""
    return np.concatenate([backbone.predict_on_batch(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def frozen_digest(model: keras.Model) -> str:
    """A fingerprint of the weights that do not train (a frozen backbone's): parties whose
    frozen parts differ would average heads trained on different features."""
    digest = hashlib.sha256()
    for weight in model.non_trainable_weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()[:16]


def _reset_optimizer(optimizer: keras.optimizers.Optimizer, learning_rate: float) -> None:
    # Keras has no public reset; zeroing its slots (moments, iteration count) makes
    # a reused optimizer behave like a freshly built one.
    for variable in optimizer.variables:
        variable.assign(tf.zeros_like(variable))
    optimizer.learning_rate.assign(learning_rate)


def light_augmentation(seed: int) -> keras.Sequential:
    """Random horizontal flips, shifts of up to 10 % and rotations of up to 18 degrees,
    seeded: Keras' preprocessing layers, applied to training batches only."""
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomTranslation(0.1, 0.1, seed=seed + 1),
        keras.layers.RandomRotation(0.05, seed=seed + 2),
    ], name="augment")


def local_batches(x: np.ndarray, y: np.ndarray, batch_size: int, epochs: int, seed: int,
                  augment: bool = False) -> tf.data.Dataset:
    """All local epochs as one stream of batches of (x, y), reshuffled (seeded) each epoch,
    and with `augment` each batch of images randomly transformed (`light_augmentation`).

    One stream rather than one Keras epoch per local epoch: Keras' per-epoch work (a new
    iterator, callbacks, a metrics read-back) is paid once (docs/benchmarks.md). Keras turns
    NumPy arrays into a tf.data pipeline of its own with autotune on, which left some fits
    idle for seconds here; so autotune is off.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    data = tf.data.Dataset.from_tensor_slices((x, y))
    data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(batch_size).repeat(epochs)
    if augment:
        transform = light_augmentation(seed % 2**30)
        data = data.map(lambda images, labels: (transform(images, training=True), labels))
    return data.prefetch(1).with_options(options)


def train(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    proximal_mu: float = 0.0,
    augment: bool = False,
) -> dict[str, float]:
    """Train in place from the model's current weights for `epochs` passes over (x, y),
    `augment`ed or not.

    Returns loss and accuracy averaged over all of the local training, as TensorFlow
    Federated reports a client's training metrics.

    With a `ProximalModel`, `proximal_mu` > 0 keeps the weights near their starting point.
    """
    _reset_optimizer(model.optimizer, learning_rate)
    if isinstance(model, ProximalModel):
        model.set_anchor(proximal_mu)
    elif proximal_mu:
        raise ValueError("proximal_mu needs a model built with proximal=True")
    batches = local_batches(x, y, batch_size, epochs, seed, augment)
    history = model.fit(batches, epochs=1, shuffle=False, verbose=0)
    return {
        "train_loss": float(history.history["loss"][-1]),
        "train_accuracy": float(history.history["accuracy"][-1]),
    }


class Evaluation(NamedTuple):
    loss: float
    accuracy: float
    predicted: np.ndarray  # the predicted class of each image


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int) -> Evaluation:
    """The model's loss, accuracy and predictions on (x, y), from one forward pass.

    Batch by batch through Keras' `predict_on_batch`, with the compiled loss function:
    `evaluate` builds an input pipeline at every call, which made up almost half of a
    client's evaluation (docs/benchmarks.md), and gives no predictions to count per class.
    """
    if not len(x):
        raise ValueError("nothing to evaluate on: no images given")
    probabilities = np.concatenate([model.predict_on_batch(x[i:i + batch_size])
                                    for i in range(0, len(x), batch_size)])
    loss = np.mean(keras.losses.get(model.loss)(y, probabilities))
    predicted = probabilities.argmax(axis=1)
    return Evaluation(float(loss), float(np.mean(predicted == y)), predicted)


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(classes, classes) int64: images per (true class, predicted class)."""
    return tf.math.confusion_matrix(labels, predicted, num_classes, dtype=tf.int64).numpy()


class ClassScores(NamedTuple):
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray  # true images of each class
    macro_f1: float


def class_scores(confusion: np.ndarray) -> ClassScores:
    """Per-class precision, recall and F1 from confusion counts, as scikit-learn computes
    them: 0 where undefined (a class never predicted, or without images), and the macro F1
    over the classes that occur as truth or prediction."""
    hits = np.diag(confusion).astype(float)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    occurring = (support > 0) | (predicted > 0)
    return ClassScores(precision, recall, f1, support, float(f1[occurring].mean()) if occurring.any() else 0.0)


def limit_threads(num_threads: int) -> None:
    """Size TensorFlow's thread pools to the CPUs one client gets.

    Must run before TensorFlow's first op in the process; later calls are ignored,
    since TensorFlow cannot resize its pools once they exist.
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(num_threads)
        tf.config.threading.set_inter_op_parallelism_threads(num_threads)
    except RuntimeError:
        pass
