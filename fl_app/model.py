"""The Keras models and how one party trains and evaluates them (no Flower here).

A model is built and compiled once per process and reused for every client that the
process serves: `train` resets the optimizer state first, so no client inherits another
client's momentum or Adam moments.
"""

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from fl_app.library_patches import fuse_adam


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
OPTIMIZERS = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    optimizer: str,
    loss: str,
    learning_rate: float,
    proximal: bool = False,
    steps_per_execution: int = 1,
) -> keras.Model:
    """Build and compile a model from config names (see `conf/model`).

    proximal=True wraps it for FedProx (`ProximalModel`). steps_per_execution > 1 runs that
    many batches per TensorFlow call: the same steps and weights, less Python per batch.
    """
    model = MODELS[name](input_shape, num_classes)
    if proximal:
        model = ProximalModel(model)
    keras_optimizer = OPTIMIZERS[optimizer](learning_rate=learning_rate)
    if isinstance(keras_optimizer, keras.optimizers.Adam):
        fuse_adam(keras_optimizer)  # one TensorFlow kernel a weight (fl_app.library_patches)
    model.compile(
        optimizer=keras_optimizer,
        loss=loss,
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def summary_text(model: keras.Model) -> str:
    """Keras' summary (layers, output shapes, parameter counts) as text, for logs and files."""
    parts = []
    model.summary(print_fn=parts.append)
    return "\n".join(parts).rstrip()


def initial_weights(name: str, input_shape: tuple[int, int, int], num_classes: int,
                    seed: int) -> list[np.ndarray]:
    """The global model's starting weights, identical for a given seed."""
    keras.utils.set_random_seed(seed)
    return MODELS[name](input_shape, num_classes).get_weights()


def _reset_optimizer(optimizer: keras.optimizers.Optimizer, learning_rate: float) -> None:
    # Keras has no public reset; zeroing its slots (moments, iteration count) makes
    # a reused optimizer behave like a freshly built one.
    for variable in optimizer.variables:
        variable.assign(tf.zeros_like(variable))
    optimizer.learning_rate.assign(learning_rate)


def local_batches(x: np.ndarray, y: np.ndarray, batch_size: int, epochs: int, seed: int) -> tf.data.Dataset:
    """All local epochs as one stream of batches of (x, y), reshuffled (seeded) each epoch.

    One stream rather than one Keras epoch per local epoch: Keras' per-epoch work (a new
    iterator, callbacks, a metrics read-back) is paid once (docs/benchmarks.md). Keras turns
    NumPy arrays into a tf.data pipeline of its own with autotune on, which left some fits
    idle for seconds here; so autotune is off.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    data = tf.data.Dataset.from_tensor_slices((x, y))
    data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return data.batch(batch_size).repeat(epochs).prefetch(1).with_options(options)


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
) -> dict[str, float]:
    """Train in place from the model's current weights for `epochs` passes over (x, y).

    Returns loss and accuracy averaged over all of the local training, as TensorFlow
    Federated reports a client's training metrics.

    With a `ProximalModel`, `proximal_mu` > 0 keeps the weights near their starting point.
    """
    _reset_optimizer(model.optimizer, learning_rate)
    if isinstance(model, ProximalModel):
        model.set_anchor(proximal_mu)
    elif proximal_mu:
        raise ValueError("proximal_mu needs a model built with proximal=True")
    history = model.fit(local_batches(x, y, batch_size, epochs, seed), epochs=1, shuffle=False, verbose=0)
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
    flat = np.asarray(labels, np.int64) * num_classes + predicted
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


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
