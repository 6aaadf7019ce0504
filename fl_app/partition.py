"""Split a dataset into the parties' local datasets (no Flower here).

A partitioner maps the training labels to one index array per party; a party then
materialises only its own rows. The splitting itself is done by `flwr-datasets`
partitioners, run on a table of (label, row index) so that they never touch images.
The split is computed once per process and cached (the images are, by fl_app.task), so
a worker serving many virtual clients reads the files once. An image-folder task may
instead give each party its own folder (`clients_dir`), as a partner in deployment does
(`load_own_images`).
"""

import warnings
from functools import cached_property, lru_cache
from pathlib import Path

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    Partitioner,
    ShardPartitioner,
    SizePartitioner,
)

from fl_app.config_schema import ConfigError
from fl_app.data import DatasetError, scale_images
from fl_app.image_folder import list_images
from fl_app.task import Task, folder_images, held_out_size, party_set, too_few_to_split, training_set

datasets.disable_progress_bars()  # a bar per partition would drown the run's log


def iid(labels: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Equal-sized (to within one sample), disjoint, seeded random partitions.

    Written here because flwr-datasets' IidPartitioner goes through a Hugging Face
    Dataset for every partition: minutes for 10,000 clients (docs/benchmarks.md).
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


def _pathological(num_partitions: int, seed: int, labels: np.ndarray, shards_per_client: int) -> Partitioner:
    # McMahan et al. 2017: sort by label, cut 2 x clients equal shards, deal 2 per client.
    return ShardPartitioner(num_partitions, "label", num_shards_per_partition=shards_per_client, seed=seed)


def _dirichlet(num_partitions: int, seed: int, labels: np.ndarray, alpha: float,
               min_partition_size: int) -> Partitioner:
    # Label skew: each class is spread over the clients by proportions ~ Dir(alpha).
    return DirichletPartitioner(
        num_partitions, "label", alpha, min_partition_size=min_partition_size, seed=seed
    )


def _quantity_skew(num_partitions: int, seed: int, labels: np.ndarray, alpha: float,
                   min_partition_size: int) -> Partitioner:
    """Sizes ~ Dir(alpha) (Li et al. 2022, NIID-Bench), labels IID within each client.

    flwr-datasets has fixed size curves (linear, square, exponential) but no random
    Dirichlet sizes, so only the sizes are drawn here; SizePartitioner cuts them.
    """
    spare = len(labels) - num_partitions * min_partition_size
    if spare < 0:
        raise ConfigError(
            "partitioner.min_partition_size",
            f"got {min_partition_size}: {num_partitions} clients x {min_partition_size} exceed the "
            f"{len(labels)} training samples; at most {len(labels) // num_partitions}",
        )
    rng = np.random.default_rng(seed)
    sizes = min_partition_size + rng.multinomial(spare, rng.dirichlet(np.full(num_partitions, alpha)))
    return SizePartitioner([int(size) for size in sizes])


# The non-IID splits, from flwr-datasets (conf/partitioner/<name>.yaml holds their settings).
FLWR_PARTITIONERS = {
    "pathological": _pathological,
    "dirichlet": _dirichlet,
    "quantity_skew": _quantity_skew,
}


class Split:
    """Every party's row indices under one partitioning of the training labels.

    A flwr-datasets partitioner assigns all rows at the first lookup; each party's
    rows are then read on demand, so a worker pays only for the clients it serves.
    """

    def __init__(self, labels: np.ndarray, partitioner: str, num_partitions: int, seed: int,
                 **params) -> None:
        if num_partitions > len(labels):
            raise ConfigError("num_clients", f"got {num_partitions}, but the training set has {len(labels)} "
                              f"samples: at most {len(labels)}")
        self.labels = labels
        self._settings = params  # the partitioner's own, named in its errors
        self.num_partitions = num_partitions
        self._iid = iid(labels, num_partitions, seed) if partitioner == "iid" else None
        if self._iid is None:
            self._splitter = FLWR_PARTITIONERS[partitioner](num_partitions, seed, labels, **params)
            rows = datasets.Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
            # Shuffled first: size partitioners cut contiguous ranges.
            self._splitter.dataset = rows.shuffle(seed=seed)

    def rows(self, partition_id: int) -> np.ndarray:
        """The sorted training-set rows of party `partition_id`."""
        if self._iid is not None:
            return self._iid[partition_id]
        with warnings.catch_warnings():  # pyarrow deprecations inside flwr-datasets' sort
            warnings.simplefilter("ignore", FutureWarning)
            try:
                part = self._splitter.load_partition(partition_id)
            except ValueError as err:  # flwr-datasets found no split with these settings
                raise ConfigError(
                    ", ".join(f"partitioner.{key}" for key in self._settings),
                    f"got {', '.join(map(str, self._settings.values()))}, but flwr-datasets found no split of "
                    f"{len(self.labels)} samples into {self.num_partitions} clients with them: {err}",
                ) from None
        # `[:]` takes the column in one slice; `part["row"]` is a lazy column that
        # numpy would read row by row, ten times slower (docs/benchmarks.md).
        return np.sort(part.with_format("numpy")[:]["row"])

    def label_counts(self, num_classes: int) -> np.ndarray:
        """(parties, classes): how many samples of each class every party holds."""
        return np.stack([
            np.bincount(self.labels[self.rows(i)], minlength=num_classes)
            for i in range(self.num_partitions)
        ])


class ClientData:
    """One party's local data: training and held-out rows of its images and labels.

    The images of each part are gathered and scaled for the model when first read: a
    client call reads one part (a fit the training rows, an evaluation the held-out ones),
    and scaling both had cost an evaluation call a fifth of its time (docs/benchmarks.md).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, train_rows: np.ndarray,
                 val_rows: np.ndarray) -> None:
        self._images = images
        self._train_rows, self._val_rows = train_rows, val_rows
        self.y_train, self.y_val = labels[train_rows], labels[val_rows]

    @cached_property
    def x_train(self) -> np.ndarray:
        return scale_images(self._images[self._train_rows])

    @cached_property
    def x_val(self) -> np.ndarray:
        return scale_images(self._images[self._val_rows])


@lru_cache(maxsize=4)
def _cached_split(task: Task, partitioner: str, num_partitions: int, seed: int,
                  params: tuple[tuple[str, object], ...]) -> Split:
    return Split(training_set(task)[1], partitioner, num_partitions, seed, **dict(params))


def load_split(task: Task, partitioner: str, num_partitions: int, seed: int, **params) -> Split:
    """The partitioning of the task's pooled training set (cached per process)."""
    return _cached_split(task, partitioner, num_partitions, seed, tuple(sorted(params.items())))


def label_counts(task: Task, partitioner: str, num_partitions: int, seed: int, **params) -> np.ndarray:
    """(parties, classes): how many training images of each class every party holds: its
    own folder's (`clients_dir`, counted without reading the images) or its partition's."""
    if not task.clients_dir:
        return load_split(task, partitioner, num_partitions, seed, **params).label_counts(len(task.classes))
    return np.stack([
        np.bincount([label for _, label in list_images(Path(task.clients_dir, party), task.classes)],
                    minlength=len(task.classes))
        for party in task.parties
    ])


def load_client_data(
    task: Task,
    partitioner: str,
    partition_id: int,
    num_partitions: int,
    val_fraction: float,
    seed: int,
    **params,
) -> ClientData:
    """Party `partition_id`'s data, split (seeded) into local train and held-out parts: its
    own folder of `clients_dir`, or its partition of the pooled training set."""
    if task.clients_dir:
        images, labels = party_set(task, partition_id)
        return _hold_out(images, labels, np.arange(len(labels)), val_fraction, [seed, partition_id])
    rows = load_split(task, partitioner, num_partitions, seed, **params).rows(partition_id)
    images, labels = training_set(task)
    return _hold_out(images, labels, rows, val_fraction, [seed, partition_id])


def load_own_images(folder: str, task: Task, val_fraction: float, seed: int) -> ClientData:
    """A partner's own image folder (deployment) as the task's classes and input shape,
    split (seeded) into local train and held-out parts. Read once per process."""
    images, labels = folder_images(folder, task)
    if too_few_to_split(len(labels), val_fraction):
        raise DatasetError(
            f"{folder}: its {len(labels)} image(s) are too few for a training and a held-out "
            f"part with dataset.val_fraction={val_fraction}",
            "too few images to hold some out",
        )
    return _hold_out(images, labels, np.arange(len(labels)), val_fraction, [seed])


def _hold_out(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, val_fraction: float,
              seed: list[int]) -> ClientData:
    """A seeded `val_fraction` of `rows` held out for evaluation, the rest for training."""
    shuffled = np.random.default_rng(seed).permutation(rows)
    num_val = held_out_size(len(shuffled), val_fraction)
    return ClientData(images, labels, np.sort(shuffled[num_val:]), np.sort(shuffled[:num_val]))
