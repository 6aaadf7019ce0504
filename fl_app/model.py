"""The Keras model and how one party trains and evaluates it (no Flower here).

A model is built and compiled once per process and reused for every client that the
process serves: `train` resets the optimizer state first, so no client inherits another
client's momentum or Adam moments.
"""

import keras
import numpy as np
import tensorflow as tf

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def build_seed_cnn() -> keras.Model:
    """The seed notebook's CNN: 693,962 trainable parameters on 28x28x1 input."""
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(NUM_CLASSES, activation="softmax"),
        ],
        name="seed_cnn",
    )


MODELS = {"seed_cnn": build_seed_cnn}
OPTIMIZERS = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}


def build_model(name: str, optimizer: str, loss: str, learning_rate: float) -> keras.Model:
    """Build and compile a model from config names (see `conf/model`)."""
    model = MODELS[name]()
    model.compile(
        optimizer=OPTIMIZERS[optimizer](learning_rate=learning_rate),
        loss=loss,
        metrics=["accuracy"],
    )
    return model


def initial_weights(name: str, seed: int) -> list[np.ndarray]:
    """The global model's starting weights, identical for a given seed."""
    keras.utils.set_random_seed(seed)
    return MODELS[name]().get_weights()


def _reset_optimizer(optimizer: keras.optimizers.Optimizer, learning_rate: float) -> None:
    # Keras has no public reset; zeroing its slots (moments, iteration count) makes
    # a reused optimizer behave like a freshly built one.
    for variable in optimizer.variables:
        variable.assign(tf.zeros_like(variable))
    optimizer.learning_rate.assign(learning_rate)


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """Seeded reshuffle each epoch; autotune off: it left some fits idle for seconds."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .prefetch(1)
        .with_options(options)
    )


def train(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> dict[str, float]:
    """Train in place from the model's current weights; return last-epoch loss/accuracy."""
    _reset_optimizer(model.optimizer, learning_rate)
    history = model.fit(_batches(x, y, batch_size, seed), epochs=epochs, shuffle=False, verbose=0)
    return {
        "train_loss": float(history.history["loss"][-1]),
        "train_accuracy": float(history.history["accuracy"][-1]),
    }


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
    """Return (loss, accuracy) of the model's current weights on (x, y)."""
    loss, accuracy = model.evaluate(x, y, batch_size=batch_size, verbose=0)
    return float(loss), float(accuracy)


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
