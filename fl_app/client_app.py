"""ClientApp: a Flower NumPyClient that trains the Keras model on one party's data.

Each Flower worker process builds its Keras model once (`worker_model`) and serves every
virtual client it runs with it; each client loads only its own data: a partition of the
configured dataset, or (deployment) the institution's own image folder.
"""

from collections.abc import Callable
from functools import lru_cache
from logging import ERROR, INFO
from typing import NamedTuple

from fl_app.console import import_tensorflow_into_the_log

# Before Keras: in deployment every message starts a ClientApp process, and TensorFlow's
# start-up lines would fill the partner's SuperNode log around its per-round lines.
import_tensorflow_into_the_log()

import keras
import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import (
    LocalDpMod,
    fixedclipping_mod,
    make_ffn,
    secaggplus_mod,
)
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Context, Message, NDArrays, Scalar
from flwr.common.logger import log

from fl_app import model as keras_model
from fl_app.config import from_run_config
from fl_app.config_schema import CENTRAL_DP, AppConfig, PrivacyConfig, own_settings
from fl_app.data import DatasetError
from fl_app.partition import ClientData, load_client_data, load_own_images
from fl_app.task import task_of


class WorkerModel(NamedTuple):
    """A worker process's compiled model. With a frozen backbone (`model.train=head`) also
    the backbone alone, which gives each client's features once per process, and the head, which trains
    on them (`keras_model.head_on_features`)."""

    model: keras.Model
    frozen: bool
    backbone: keras.Model | None = None
    head: keras.Model | None = None
    frozen_digest: str | None = None  # the frozen weights never change: fingerprinted once


# (frozen backbone's digest, client, split) -> the backbone's features of those images: a
# frozen backbone gives the same features every round, so each client computes them once.
_features: dict[tuple[str, str, str], np.ndarray] = {}


class KerasClient(NumPyClient):
    """One party: trains on its local split, evaluates on its held-out split.

    `name` says which party it is in the server's per-party table (clients.csv).
    """

    def __init__(self, worker: WorkerModel, data: ClientData, name: str, partition_id: int | None,
                 cfg: AppConfig):
        self.worker = worker
        self.data = data
        self.name = name
        self.partition_id = partition_id
        self.cfg = cfg

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return keras_model.exchanged_weights(self.worker.model, self.worker.frozen)

    def _learner(self, split: str) -> tuple[keras.Model, np.ndarray]:
        """What trains or evaluates on `split` ("train", "val"), and its input: the whole
        model on the images, or the head on the frozen backbone's features of them."""
        images = self.data.x_train if split == "train" else self.data.x_val
        if not self.worker.frozen:
            return self.worker.model, images
        key = (self.worker.frozen_digest, self.name, split)
        if key not in _features:
            _features[key] = keras_model.features(self.worker.backbone, images, self.cfg.eval_batch_size)
        return self.worker.head, _features[key]

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        keras_model.set_exchanged_weights(self.worker.model, parameters, self.worker.frozen)
        learner, inputs = self._learner("train")
        # Same seed, round and party give the same batches: runs are reproducible.
        party = [] if self.partition_id is None else [self.partition_id]
        seeds = np.random.SeedSequence([self.cfg.seed, int(config["server_round"]), *party])
        metrics = keras_model.train(
            learner,
            inputs,
            self.data.y_train,
            epochs=int(config["local_epochs"]),
            batch_size=int(config["batch_size"]),
            learning_rate=float(config["learning_rate"]),
            seed=int(seeds.generate_state(1)[0]),
            proximal_mu=float(config.get("proximal_mu", 0.0)),  # sent by FedProx only
            augment=self.cfg.augment == "light",
        )
        # The partner's own log (its SuperNode's) shows what it did each round.
        log(INFO, "Round %s: %s trained on %s images: loss %.4f, accuracy %.4f", config["server_round"],
            self.name, len(self.data.y_train), metrics["train_loss"], metrics["train_accuracy"])
        metrics["client"] = self.name
        if self.worker.frozen:  # the server refuses a head trained on another backbone
            metrics["frozen_digest"] = self.worker.frozen_digest
        if self.partition_id is not None:
            metrics["partition_id"] = self.partition_id
        num_examples = len(self.data.y_train)
        if self.cfg.privacy.dp in CENTRAL_DP:
            # Central DP's noise assumes every client counts once; SecAgg+ weighs by this
            # figure inside the protocol, so it is set here. The real count is a metric.
            metrics["num_examples"] = num_examples
            num_examples = 1
        return self.get_parameters({}), num_examples, metrics

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        keras_model.set_exchanged_weights(self.worker.model, parameters, self.worker.frozen)
        learner, inputs = self._learner("val")
        result = keras_model.evaluate(learner, inputs, self.data.y_val, self.cfg.eval_batch_size)
        confusion = keras_model.confusion_counts(self.data.y_val, result.predicted, self.worker.model.output_shape[-1])
        log(INFO, "Round %s: %s evaluated on %s held-out images: loss %.4f, accuracy %.4f",
            config.get("server_round", "?"), self.name, len(self.data.y_val), result.loss, result.accuracy)
        # The counts let the server compute per-class figures without seeing an image.
        return result.loss, len(self.data.y_val), {
            "accuracy": result.accuracy,
            "client": self.name,
            "train_examples": len(self.data.y_train),
            "confusion_matrix": confusion.astype("<i8").tobytes(),
        }


def worker_model(cfg: AppConfig) -> WorkerModel:
    """The worker process's model for `cfg`, built once and reused by every client it serves.

    Built with the run's seed, as the server builds its own, so a frozen backbone is the same
    at every party. Its learning rate is set at every fit from the server's fit config.
    """
    task = task_of(cfg.dataset)
    return _cached_worker_model(
        cfg.model.name, task.image_shape, len(task.classes), cfg.optimizer, cfg.loss,
        cfg.mode.num_cpus_per_client, cfg.strategy.name == "fedprox",  # FedProx: the proximal term
        cfg.steps_per_execution, cfg.model.weights, cfg.model.train == "head", cfg.init_from, cfg.seed,
    )


@lru_cache(maxsize=1)
def _cached_worker_model(name: str, input_shape: tuple[int, int, int], num_classes: int, optimizer: str,
                         loss: str, num_threads: int, proximal: bool, steps_per_execution: int,
                         weights: str | None, frozen: bool, init_from: str | None, seed: int) -> WorkerModel:
    keras_model.limit_threads(num_threads)
    model = keras_model.build_model(name, input_shape, num_classes, optimizer, loss, 1e-3, proximal,
                                    steps_per_execution, weights=weights, frozen=frozen, init_from=init_from,
                                    seed=seed)
    if not frozen:
        return WorkerModel(model, frozen)
    backbone, head = keras_model.head_on_features(model, optimizer, loss, proximal, steps_per_execution)
    return WorkerModel(model, frozen, backbone, head, keras_model.frozen_digest(model))


def load_node_data(node_config: dict[str, Scalar], cfg: AppConfig) -> ClientData:
    """The node's local data: its own image folder (node config `image-dir`, deployment)
    or party `partition-id` of `num-partitions` of the task (a partition of its pooled
    training set, or a party folder of `dataset.clients_dir`)."""
    task = task_of(cfg.dataset)
    if "image-dir" in node_config:
        return load_own_images(str(node_config["image-dir"]), task, cfg.dataset.val_fraction, cfg.seed)
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise DatasetError(
            f"node config {dict(node_config)} names no local data: give the SuperNode "
            "--node-config 'image-dir=\"PATH\"' (its own images, one folder per class) or "
            f"'partition-id=I num-partitions=N' (partition I of {cfg.dataset.name})",
            "a node config that names no data",
        )
    try:
        partition_id, num_partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except ValueError:
        raise DatasetError(f"node config {dict(node_config)}: partition-id and num-partitions "
                           "must be integers", "a bad node config") from None
    if not 0 <= partition_id < num_partitions:
        raise DatasetError(
            f"node config partition-id={partition_id} is outside 0..{num_partitions - 1} "
            f"(num-partitions={num_partitions})",
            "a bad node config",
        )
    if task.clients_dir and num_partitions != len(task.parties):
        raise DatasetError(f"num-partitions={num_partitions}, but {task.clients_dir} holds "
                           f"{len(task.parties)} party folders", "a bad node config")
    return load_client_data(
        task,
        cfg.partitioner.name,
        partition_id,
        num_partitions,
        cfg.dataset.val_fraction,
        cfg.seed,
        **own_settings(cfg.partitioner),
    )


def node_name(context: Context, cfg: AppConfig) -> str:
    """How the node's party is called in the server's tables: the node config's `name`,
    its party folder's (`clients_dir`), its partition id, or else its Flower node id."""
    node_config = context.node_config
    if "name" in node_config:
        return str(node_config["name"])
    if "partition-id" in node_config:
        partition_id = int(node_config["partition-id"])
        parties = task_of(cfg.dataset).parties
        return parties[partition_id] if parties else str(partition_id)
    return f"node {context.node_id}"


def make_client(context: Context, cfg: AppConfig) -> NumPyClient:
    """The client of the node in `context`: its local data and the worker's model."""
    data = load_node_data(context.node_config, cfg)
    worker = worker_model(cfg)
    partition_id = context.node_config.get("partition-id")  # none for a node's own images
    partition_id = None if partition_id is None else int(partition_id)
    return KerasClient(worker, data, node_name(context, cfg), partition_id, cfg).to_client()


class PartyFailure(RuntimeError):
    """What the server is told when a party fails: which party, and in deployment only the
    kind of problem, never the partner's paths or file names (its own log has the error)."""


def report_failures(config_of: Callable[[Context], AppConfig]) -> Mod:
    """A mod that logs a failure whole at the party and replies with a `PartyFailure`."""

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            return call_next(message, context)
        except Exception as err:
            try:
                cfg = config_of(context)
                name, deployed = node_name(context, cfg), cfg.mode.name == "deployment"
            except Exception:  # what failed may be the run's config or the node config
                name, deployed = f"node {context.node_id}", True
            log(ERROR, "%s could not %s: %s", name, message.metadata.message_type, err, exc_info=err)
            if not deployed:  # in simulation the server's and the parties' user is one
                raise PartyFailure(f"{name}: {err}") from err
            kind = getattr(err, "kind", None) or f"an unexpected {type(err).__name__}"
            raise PartyFailure(f"{name}: {kind} (the details are in its own log)") from None

    return mod


def privacy_mods(privacy: PrivacyConfig) -> list[Mod]:
    """Flower's client mods for the configured privacy, outermost first: SecAgg+ masks what
    the clipping mod returns (Flower's required order), local DP noises the update itself."""
    mods: list[Mod] = [secaggplus_mod] if privacy.secagg else []
    if privacy.dp == "client_fixed":
        mods.append(fixedclipping_mod)
    elif privacy.dp == "local":
        clip = privacy.clipping_norm
        mods.append(LocalDpMod(clip, clip, privacy.local_epsilon, privacy.delta))
    return mods


def build_client_app(cfg: AppConfig | None = None, mods: tuple[Mod, ...] = ()) -> ClientApp:
    """A ClientApp for `cfg`, or (cfg=None, under `flwr run`) for the run config's,
    with Flower client `mods` around it (they see every message in and reply out)."""

    def config_of(context: Context) -> AppConfig:
        return cfg or from_run_config(context.run_config)

    def client_fn(context: Context) -> NumPyClient:
        return make_client(context, config_of(context))

    def privacy(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        # Chosen per message: under `flwr run` the config arrives with the message.
        return make_ffn(call_next, privacy_mods(config_of(context).privacy))(message, context)

    return ClientApp(client_fn=client_fn,
                     mods=[report_failures(config_of), *mods, privacy])


app = build_client_app()
