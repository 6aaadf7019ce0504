"""Split a dataset into the parties' local datasets (no Flower here).

A partitioner maps the training labels to one index array per party; a party then
materialises only its own rows. The dataset and the split are computed once per
process and cached, so a worker serving many virtual clients reads the files once.
"""

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from fl_app.data import load_dataset, scale_images


def iid(labels: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Equal-sized (to within one sample), disjoint, seeded random partitions.

    Written here because flwr-datasets' IidPartitioner needs a Hugging Face Dataset
    and cuts contiguous, unshuffled shards.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


PARTITIONERS = {"iid": iid}


class ClientData(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


@lru_cache(maxsize=2)
def _cached_dataset(name: str, data_dir: str) -> tuple[np.ndarray, ...]:
    return load_dataset(name, data_dir)


@lru_cache(maxsize=4)
def _cached_partitions(
    name: str, data_dir: str, partitioner: str, num_partitions: int, seed: int
) -> list[np.ndarray]:
    y_train = _cached_dataset(name, data_dir)[1]
    if num_partitions > len(y_train):
        raise ValueError(f"cannot split {len(y_train)} samples into {num_partitions} partitions")
    return PARTITIONERS[partitioner](y_train, num_partitions, seed)


def load_test_set(name: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """The full test set, scaled for the model: the server's centralised evaluation."""
    _, _, x_test, y_test = _cached_dataset(name, data_dir)
    return scale_images(x_test), y_test


def load_client_data(
    name: str,
    data_dir: str,
    partitioner: str,
    partition_id: int,
    num_partitions: int,
    val_fraction: float,
    seed: int,
) -> ClientData:
    """One party's training rows, split (seeded) into local train and held-out parts."""
    indices = _cached_partitions(name, data_dir, partitioner, num_partitions, seed)[partition_id]
    shuffled = np.random.default_rng([seed, partition_id]).permutation(indices)
    num_val = int(round(len(shuffled) * val_fraction))
    train_idx, val_idx = np.sort(shuffled[num_val:]), np.sort(shuffled[:num_val])
    x_train, y_train = _cached_dataset(name, data_dir)[:2]
    return ClientData(
        scale_images(x_train[train_idx]),
        y_train[train_idx],
        scale_images(x_train[val_idx]),
        y_train[val_idx],
    )
