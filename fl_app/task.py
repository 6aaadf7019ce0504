"""The classification task a config describes, and where its images are (no Flower here).

A task is its class names (label i is `classes[i]`), the image shape the model takes, and
where the images are. The built-in datasets fix the first two; `dataset=image_folder`
takes them from the config, and in simulation reads what the config leaves open from the
folders (`settle`). Images are read once per process and task, and shared by every
virtual client the process serves.
"""

import dataclasses
import logging
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from fl_app.config_schema import IMAGE_FOLDER, MODELS, AppConfig, ConfigError, DatasetConfig
from fl_app.data import class_names, image_shape, load_dataset, scale_images
from fl_app.image_folder import check_readable, list_images, load_image_folder, sub_folders

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Task:
    """What the model learns and from which files (hashable: it keys the caches)."""

    dataset: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]
    data_dir: str | None = None  # the built-in datasets' root
    clients_dir: str | None = None
    train_dir: str | None = None
    test_dir: str | None = None

    @property
    def parties(self) -> list[str]:
        """The party folders of `clients_dir` (one client each, in this order), else []."""
        return sub_folders(self.clients_dir) if self.clients_dir else []


def task_of(dataset: DatasetConfig) -> Task:
    """The task of a (settled) dataset config."""
    if dataset.name != IMAGE_FOLDER:
        return Task(dataset.name, class_names(dataset.name), image_shape(dataset.name), dataset.data_dir)
    if dataset.classes is None:
        raise ConfigError("dataset.classes", "is null: the class names are read from the folders "
                          "only in simulation (fl_app.task.settle)")
    return Task(dataset.name, tuple(dataset.classes), (*dataset.image_size, dataset.channels),
                clients_dir=dataset.clients_dir, train_dir=dataset.train_dir, test_dir=dataset.test_dir)


def settle(cfg: AppConfig, num_clients_given: bool) -> AppConfig:
    """`cfg` with an image-folder simulation's open settings read from its folders.

    `dataset.classes` null: the sorted names of the class folders found. With `clients_dir`,
    `num_clients` is its number of party folders (refused if given as another number), and
    each party must hold enough images for a training and a held-out part. Files are listed,
    not read. Deployment configs are returned unchanged: there the partners hold the data.
    """
    dataset = cfg.dataset
    if dataset.name != IMAGE_FOLDER or cfg.mode.name != "simulation":
        return cfg
    folders = [Path(dataset.clients_dir, party) for party in sub_folders(dataset.clients_dir)] \
        if dataset.clients_dir else [Path(dataset.train_dir)]
    if not folders:
        raise ConfigError("dataset.clients_dir", f"{dataset.clients_dir} holds no party folder: "
                          "give it one sub-folder per party, each with one sub-folder per class")
    classes = dataset.classes or sorted({name for folder in folders for name in sub_folders(folder)})
    if len(classes) < 2:
        raise ConfigError("dataset.classes", f"found only {classes} as class folders in {', '.join(map(str, folders))}: "
                          "a classifier needs at least 2 classes")
    settled = dataclasses.replace(cfg, dataset=dataclasses.replace(dataset, classes=list(classes)))
    if not dataset.clients_dir:
        list_images(dataset.train_dir, tuple(classes))  # its class folders must be the task's
        return settled
    for folder in folders:
        count = len(list_images(folder, tuple(classes)))
        if too_few_to_split(count, dataset.val_fraction):
            raise ConfigError("dataset.val_fraction", f"got {dataset.val_fraction}, but {folder} holds {count} "
                              "image(s): too few for a training and a held-out part (add images or change "
                              "val_fraction)")
    if num_clients_given and cfg.num_clients != len(folders):
        raise ConfigError("num_clients", f"got {cfg.num_clients}, but {dataset.clients_dir} holds "
                          f"{len(folders)} party folders (one client each): leave num_clients out")
    return dataclasses.replace(settled, num_clients=len(folders))


def check_model_fits(cfg: AppConfig) -> None:
    """The model can take the task's images, and the files it starts from exist: raises
    `ConfigError` naming the key before any training."""
    model, task = cfg.model, task_of(cfg.dataset)
    height, width, channels = task.image_shape
    smallest = MODELS[model.name].min_image_size
    if min(height, width) < smallest:
        raise ConfigError("model.name", f"{model.name} takes images of at least {smallest}x{smallest}; the "
                          f"{cfg.dataset.name} task's are {height}x{width} (dataset.image_size of dataset=image_folder)")
    if model.weights == "imagenet" and channels != 3:
        raise ConfigError("model.weights", f"imagenet weights take colour images, but the {cfg.dataset.name} "
                          "task's have 1 channel: set dataset.channels=3 (dataset=image_folder converts grey "
                          "images to RGB), or model.weights=null")
    for key, path in (("model.weights", None if model.weights == "imagenet" else model.weights),
                      ("init_from", cfg.init_from)):
        if path and not Path(path).is_file():
            raise ConfigError(key, f"{path}: no such file")
    if cfg.augment != "none" and model.train == "head":
        raise ConfigError("augment", f"got {cfg.augment}, but with model.train=head each client computes "
                          "its images' features once, unaugmented: use augment=none, or model.train=all")


def held_out_size(count: int, val_fraction: float) -> int:
    """How many of a party's `count` images are held out for evaluation."""
    return int(round(count * val_fraction))


def too_few_to_split(count: int, val_fraction: float) -> bool:
    """Whether `count` images leave none to train on, or none held out when some should be."""
    num_val = held_out_size(count, val_fraction)
    return count - num_val < 1 or (val_fraction > 0 and num_val < 1)


def check_images(task: Task) -> None:
    """Decode every image the task's clients and server will read, naming the first that
    cannot be: a simulation stops here rather than in its clients."""
    if task.dataset != IMAGE_FOLDER:
        return
    started = time.monotonic()
    folders = [Path(task.clients_dir, party) for party in task.parties] if task.clients_dir else [task.train_dir]
    files = [path for folder in [*folders, *filter(None, [task.test_dir])]
             for path, _ in list_images(folder, task.classes)]
    check_readable(files)
    log.info("Checked %s images in %.1f s", len(files), time.monotonic() - started)


@lru_cache(maxsize=None)
def folder_images(folder: str, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one class-folder tree, read once per process."""
    return load_image_folder(folder, task.classes, task.image_shape)


def training_set(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """The pooled training images and labels that a partitioner splits: a built-in
    dataset's training split, or `train_dir`."""
    if task.dataset == IMAGE_FOLDER:
        return folder_images(task.train_dir, task)
    return _built_in(task.dataset, task.data_dir)[:2]


def party_set(task: Task, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of party `partition_id`'s own folder in `clients_dir`."""
    return folder_images(str(Path(task.clients_dir, task.parties[partition_id])), task)


def central_test_set(task: Task) -> tuple[np.ndarray, np.ndarray] | None:
    """The server's test images (scaled for the model) and labels; None when the task has
    no test set (an image-folder task without `test_dir`)."""
    if task.dataset != IMAGE_FOLDER:
        x_test, y_test = _built_in(task.dataset, task.data_dir)[2:]
    elif task.test_dir:
        x_test, y_test = folder_images(task.test_dir, task)
    else:
        return None
    return scale_images(x_test), y_test


@lru_cache(maxsize=2)
def _built_in(name: str, data_dir: str) -> tuple[np.ndarray, ...]:
    return load_dataset(name, data_dir)
