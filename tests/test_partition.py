"""IID partitions: sizes, disjointness, determinism, and each client's local split."""

import numpy as np

from fl_app.partition import iid, load_client_data, load_test_set

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
    args = dict(name="mnist", data_dir=str(data_root), partitioner="iid", num_partitions=10,
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
    x, y = load_test_set("mnist", str(data_root))
    assert x.shape == (10_000, 28, 28, 1) and y.shape == (10_000,)
