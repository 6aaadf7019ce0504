"""The seed CNN and local training on real MNIST."""

import numpy as np

from fl_app import model as keras_model
from fl_app.partition import load_client_data


def test_seed_cnn_has_the_seed_notebooks_parameter_count():
    model = keras_model.build_seed_cnn()
    assert model.count_params() == 693_962
    assert [layer.__class__.__name__ for layer in model.layers] == [
        "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"
    ]


def test_initial_weights_are_fixed_by_the_seed():
    a, b = keras_model.initial_weights("seed_cnn", 7), keras_model.initial_weights("seed_cnn", 7)
    c = keras_model.initial_weights("seed_cnn", 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_training_learns_and_is_reproducible(data_root):
    data = load_client_data("mnist", str(data_root), "iid", 0, 30, 0.1, seed=0)  # 1,800 images
    model = keras_model.build_model("seed_cnn", "adam", "sparse_categorical_crossentropy", 0.002)
    start = keras_model.initial_weights("seed_cnn", 0)
    runs = []
    for _ in range(2):
        model.set_weights(start)
        metrics = keras_model.train(model, data.x_train, data.y_train, epochs=1, batch_size=32,
                                    learning_rate=0.002, seed=5)
        runs.append((metrics, model.get_weights()))
    loss, accuracy = keras_model.evaluate(model, data.x_val, data.y_val, batch_size=256)
    assert accuracy > 0.8, accuracy
    # Optimizer state is reset per fit: the same start, data and seed give the same weights.
    assert runs[0][0] == runs[1][0]
    assert all(np.allclose(x, y) for x, y in zip(runs[0][1], runs[1][1]))
