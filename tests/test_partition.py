"""Partitions (IID and the non-IID splits): sizes, label skew, disjointness,
determinism, and each client's local split."""

import numpy as np
import pytest
from conftest import mnist_task

from fl_app.config_schema import ConfigError
from fl_app.partition import Split, iid, load_client_data
from fl_app.task import central_test_set

LABELS = np.arange(60_000) % 10


def test_iid_partitions_cover_everything_once_with_equal_sizes():
    parts = iid(LABELS, 7, seed=1)
    sizes = [len(p) for p in parts]
    assert len(parts) == 7 and max(sizes) - min(sizes) <= 1
    joined = np.concatenate(parts)
    assert len(joined) == 60_000 and len(np.unique(joined)) == 60_000


def test_iid_partitions_depend_on_the_seed_only():
    first, again, other = iid(LABELS, 10, 3), iid(LABELS, 10, 3), iid(LABELS, 10, 4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_client_gets_only_its_partition_split_into_train_and_held_out(data_root):
    args = dict(task=mnist_task(data_root), partitioner="iid", num_partitions=10,
                val_fraction=0.1, seed=0)
    a = load_client_data(partition_id=0, **args)
    b = load_client_data(partition_id=1, **args)
    assert len(a.x_train) == 5400 and len(a.x_val) == 600
    assert a.x_train.shape[1:] == (28, 28, 1) and a.x_train.dtype == np.float32
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    # Disjoint: no image of client 0 (train or held-out) appears at client 1.
    rows_a = {r.tobytes() for r in np.concatenate([a.x_train, a.x_val])}
    assert not any(r.tobytes() in rows_a for r in b.x_train)
    again = load_client_data(partition_id=0, **args)
    assert np.array_equal(a.x_val, again.x_val) and np.array_equal(a.y_train, again.y_train)


def test_test_set_is_the_full_scaled_test_split(data_root):
    x, y = central_test_set(mnist_task(data_root))
    assert x.shape == (10_000, 28, 28, 1) and y.shape == (10_000,)


NON_IID = {
    "pathological": {"shards_per_client": 2},
    "dirichlet": {"alpha": 0.5, "min_partition_size": 10},
    "quantity_skew": {"alpha": 0.5, "min_partition_size": 10},
}
SHUFFLED = np.random.default_rng(0).permutation(LABELS)


@pytest.mark.parametrize("name", ["iid", *NON_IID])
def test_every_split_is_disjoint_complete_and_fixed_by_the_seed(name):
    params = NON_IID.get(name, {})
    split = Split(SHUFFLED, name, 20, 1, **params)
    parts = [split.rows(i) for i in range(20)]
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) == len(SHUFFLED)
    again, other = Split(SHUFFLED, name, 20, 1, **params), Split(SHUFFLED, name, 20, 2, **params)
    assert all(np.array_equal(split.rows(i), again.rows(i)) for i in range(20))
    assert not all(np.array_equal(split.rows(i), other.rows(i)) for i in range(20))


def test_pathological_split_gives_each_client_two_label_shards_as_in_the_paper():
    counts = Split(SHUFFLED, "pathological", 100, 1, shards_per_client=2).label_counts(10)
    assert np.all(counts.sum(axis=1) == 600)  # 200 shards of 300, two per client
    labels_held = (counts > 0).sum(axis=1)
    # A shard can straddle two labels (class sizes are not multiples of 300).
    assert labels_held.max() <= 4 and np.median(labels_held) <= 2


def test_dirichlet_alpha_sets_the_label_skew():
    def labels_per_client(alpha):
        counts = Split(SHUFFLED, "dirichlet", 50, 1, alpha=alpha, min_partition_size=10).label_counts(10)
        assert counts.sum(axis=1).min() >= 10
        return (counts / counts.sum(axis=1, keepdims=True) > 0.02).sum(axis=1).mean()

    assert labels_per_client(0.1) < 5 and labels_per_client(100.0) > 9.5


def test_quantity_skew_varies_sizes_but_not_labels():
    counts = Split(SHUFFLED, "quantity_skew", 50, 1, alpha=0.5, min_partition_size=10).label_counts(10)
    sizes = counts.sum(axis=1)
    assert sizes.min() >= 10 and sizes.max() > 5 * np.median(sizes) / 2
    big = counts[sizes >= 1000]
    assert len(big) and np.all(np.abs(big / big.sum(axis=1, keepdims=True) - 0.1) < 0.05)


@pytest.mark.parametrize("name, clients, params, key", [
    ("iid", 60_001, {}, "num_clients"),
    ("quantity_skew", 50, {"alpha": 0.5, "min_partition_size": 1201}, "partitioner.min_partition_size"),
    # flwr-datasets draws 10 times, then gives up: no client may end with < 10 samples.
    ("dirichlet", 50, {"alpha": 0.001, "min_partition_size": 10}, "partitioner.alpha, partitioner.min_partition_size"),
])
def test_settings_the_training_set_cannot_meet_fail_naming_their_keys(name, clients, params, key):
    with pytest.raises(ConfigError, match=f"Invalid config key '{key}'"):
        Split(SHUFFLED, name, clients, 1, **params).rows(0)


def test_non_iid_client_data_is_its_partition(data_root):
    args = dict(task=mnist_task(data_root), partitioner="pathological", num_partitions=100,
                val_fraction=0.1, seed=0, shards_per_client=2)
    data = load_client_data(partition_id=5, **args)
    assert len(data.x_train) + len(data.x_val) == 600
    assert len(np.unique(np.concatenate([data.y_train, data.y_val]))) <= 4
