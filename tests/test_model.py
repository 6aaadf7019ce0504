"""The models, local training on real MNIST, and FedProx's proximal term."""

import keras
import numpy as np
import pytest
from conftest import mnist_task

from fl_app import model as keras_model
from fl_app.partition import load_client_data

LOSS = "sparse_categorical_crossentropy"


MNIST_SHAPE = (28, 28, 1)


@pytest.mark.parametrize(
    "name, params, layers",
    [
        ("seed_cnn", 693_962, ["Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"]),
        ("mcmahan_cnn", 1_663_370, ["Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten",
                                    "Dense", "Dense"]),
        ("mcmahan_2nn", 199_210, ["Flatten", "Dense", "Dense", "Dense"]),
    ],
)
def test_models_have_their_papers_parameter_counts(name, params, layers):
    model = keras_model.MODELS[name](MNIST_SHAPE, 10)
    assert model.count_params() == params
    assert [layer.__class__.__name__ for layer in model.layers] == layers


@pytest.mark.parametrize("name", sorted(keras_model.MODELS))
@pytest.mark.parametrize("shape, classes", [((32, 32, 3), 10), ((48, 40, 3), 3), ((20, 24, 1), 7)])
def test_models_build_for_any_task(name, shape, classes):
    model = keras_model.MODELS[name](shape, classes)
    assert model.predict(np.zeros((2, *shape), np.float32), verbose=0).shape == (2, classes)


def test_initial_weights_are_fixed_by_the_seed():
    a = keras_model.initial_weights("seed_cnn", MNIST_SHAPE, 10, 7)
    b = keras_model.initial_weights("seed_cnn", MNIST_SHAPE, 10, 7)
    c = keras_model.initial_weights("seed_cnn", MNIST_SHAPE, 10, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_training_learns_and_is_reproducible(data_root):
    data = load_client_data(mnist_task(data_root), "iid", 0, 30, 0.1, seed=0)  # 1,800 images
    model = keras_model.build_model("seed_cnn", MNIST_SHAPE, 10, "adam", LOSS, 0.002)
    start = keras_model.initial_weights("seed_cnn", MNIST_SHAPE, 10, 0)
    runs = []
    for _ in range(2):
        model.set_weights(start)
        metrics = keras_model.train(model, data.x_train, data.y_train, epochs=1, batch_size=32,
                                    learning_rate=0.002, seed=5)
        runs.append((metrics, model.get_weights()))
    _, accuracy, _ = keras_model.evaluate(model, data.x_val, data.y_val, batch_size=256)
    assert accuracy > 0.8, accuracy
    # Optimizer state is reset per fit: the same start, data and seed give the same weights.
    assert runs[0][0] == runs[1][0]
    assert all(np.allclose(x, y) for x, y in zip(runs[0][1], runs[1][1]))


def test_local_epochs_are_full_passes_each_in_a_new_order():
    x = np.arange(25)
    stream = [(bx.numpy(), by.numpy()) for bx, by in keras_model.local_batches(x, x % 10, 10, 3, seed=1)]
    # 3 passes over 25 samples in batches of 10: each pass ends with its own short batch.
    assert [len(bx) for bx, _ in stream] == [10, 10, 5] * 3
    assert all(np.array_equal(bx % 10, by) for bx, by in stream)
    passes = [tuple(np.concatenate([bx for bx, _ in stream[i:i + 3]])) for i in (0, 3, 6)]
    assert all(sorted(order) == list(range(25)) for order in passes)
    assert len(set(passes)) == 3
    again = [bx.numpy() for bx, _ in keras_model.local_batches(x, x % 10, 10, 3, seed=1)]
    assert all(np.array_equal(a, b) for a, (b, _) in zip(again, stream))


def train_from(start, data, proximal: bool, mu: float, steps_per_execution: int = 1):
    """Weights after 2 SGD epochs from `start`, and their distance from it."""
    model = keras_model.build_model("seed_cnn", MNIST_SHAPE, 10, "sgd", LOSS, 0.05, proximal=proximal,
                                    steps_per_execution=steps_per_execution)
    model.set_weights(start)
    keras_model.train(model, data.x_train, data.y_train, epochs=2, batch_size=32,
                      learning_rate=0.05, seed=1, proximal_mu=mu)
    weights = model.get_weights()
    return weights, np.sqrt(sum(np.sum((w - s) ** 2) for w, s in zip(weights, start)))


def test_evaluation_in_batches_equals_keras_evaluate(data_root):
    # 600 images in batches of 256: the last, short batch must weigh by its size.
    data = load_client_data(mnist_task(data_root), "iid", 0, 10, 0.1, seed=0)
    model = keras_model.build_model("seed_cnn", MNIST_SHAPE, 10, "sgd", LOSS, 0.01)
    model.set_weights(keras_model.initial_weights("seed_cnn", MNIST_SHAPE, 10, 0))
    expected = model.evaluate(data.x_val, data.y_val, batch_size=256, verbose=0)
    loss, accuracy, predicted = keras_model.evaluate(model, data.x_val, data.y_val, 256)
    assert np.allclose((loss, accuracy), expected, rtol=1e-6)
    assert np.array_equal(predicted, model.predict(data.x_val, verbose=0).argmax(axis=1))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        keras_model.evaluate(model, data.x_val[:0], data.y_val[:0], 256)


def test_fedprox_with_mu_zero_is_fedavg_and_mu_pulls_towards_the_global_model(data_root):
    data = load_client_data(mnist_task(data_root), "iid", 3, 100, 0.1, seed=0)  # 540 images
    start = keras_model.initial_weights("seed_cnn", MNIST_SHAPE, 10, 0)
    plain, plain_distance = train_from(start, data, proximal=False, mu=0.0)
    mu_zero, mu_zero_distance = train_from(start, data, proximal=True, mu=0.0)
    # The proximal model exchanges exactly the plain model's weights, and mu=0 changes nothing.
    assert [w.shape for w in mu_zero] == [w.shape for w in plain]
    assert all(np.array_equal(a, b) for a, b in zip(plain, mu_zero))
    distances = [train_from(start, data, proximal=True, mu=mu)[1] for mu in (0.1, 1.0)]
    assert plain_distance == mu_zero_distance > distances[0] > distances[1]


def test_steps_per_execution_changes_the_speed_not_the_weights(data_root):
    data = load_client_data(mnist_task(data_root), "iid", 3, 100, 0.1, seed=0)  # 17 batches an epoch
    start = keras_model.initial_weights("seed_cnn", MNIST_SHAPE, 10, 0)
    for proximal, mu in ((False, 0.0), (True, 0.1)):
        one_by_one = train_from(start, data, proximal, mu)[0]
        for steps in (5, 64):  # neither divides 17
            batched = train_from(start, data, proximal, mu, steps_per_execution=steps)[0]
            assert all(np.array_equal(a, b) for a, b in zip(one_by_one, batched)), (proximal, steps)


def test_adam_runs_as_one_fused_kernel_with_keras_adams_arithmetic_and_saves_as_keras_adam(data_root, tmp_path):
    data = load_client_data(mnist_task(data_root), "iid", 3, 100, 0.1, seed=0)
    x, y = data.x_train[:50], data.y_train[:50]  # 5 steps of B=10
    start = keras_model.initial_weights("seed_cnn", MNIST_SHAPE, 10, 0)
    fused = keras_model.build_model("seed_cnn", MNIST_SHAPE, 10, "adam", LOSS, 0.002)
    assert "update_step" in vars(fused.optimizer)  # the fused step replaces Keras' own
    stock = keras_model.MODELS["seed_cnn"](MNIST_SHAPE, 10)
    stock.compile(optimizer=keras.optimizers.Adam(0.002), loss=LOSS, metrics=["accuracy"])
    trained = []
    for model in (fused, stock):
        model.set_weights(start)
        keras_model.train(model, x, y, epochs=1, batch_size=10, learning_rate=0.002, seed=1)
        trained.append((model.get_weights(), [v.numpy() for v in model.optimizer.variables]))
    (weights, slots), (stock_weights, stock_slots) = trained
    assert max(np.abs(a - b).max() for a, b in zip(weights, start)) > 1e-3  # it trained
    # The same arithmetic up to float rounding (the order of operations differs).
    assert all(np.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(weights, stock_weights))
    # Moments, velocities, step count and learning rate: within 1e-4 of each one's largest value.
    assert all(np.abs(a - b).max() <= 1e-4 * np.abs(b).max() for a, b in zip(slots, stock_slots))
    fused.save(tmp_path / "model.keras")
    assert type(keras.models.load_model(tmp_path / "model.keras").optimizer) is keras.optimizers.Adam


def test_proximal_mu_without_a_proximal_model_is_refused(data_root):
    data = load_client_data(mnist_task(data_root), "iid", 3, 100, 0.1, seed=0)
    model = keras_model.build_model("seed_cnn", MNIST_SHAPE, 10, "sgd", LOSS, 0.05)
    with pytest.raises(ValueError, match="proximal=True"):
        keras_model.train(model, data.x_train, data.y_train, epochs=1, batch_size=32,
                          learning_rate=0.05, seed=1, proximal_mu=0.1)
