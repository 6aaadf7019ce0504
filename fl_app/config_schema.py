"""Typed schema of the Hydra configuration, with the value checks types cannot express.

Hydra merges `conf/*.yaml` into these dataclasses, so unknown keys and wrong types are
rejected while composing. `AppConfig.__post_init__` then checks values and relations
(ranges, known names, `min_fit_clients <= num_clients`), so every way of building a
config (Hydra CLI, `flwr run`, tests) fails before any training with a message naming
the key and what is allowed. This module imports nothing of ours on purpose.
"""

from dataclasses import dataclass

DATASETS = ("mnist", "fashion_mnist", "cifar10")
PARTITIONERS = ("iid",)
MODELS = ("seed_cnn",)
STRATEGIES = ("fedavg",)
MODES = ("simulation",)
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("sparse_categorical_crossentropy",)


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what is allowed."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"Invalid config key '{key}': {problem}")
        self.key = key


# No defaults here: conf/*.yaml is the one place that sets (and documents) values.


@dataclass
class DatasetConfig:
    name: str
    data_dir: str
    val_fraction: float


@dataclass
class PartitionerConfig:
    name: str


@dataclass
class ModelConfig:
    name: str


@dataclass
class StrategyConfig:
    name: str


@dataclass
class ModeConfig:
    name: str
    num_cpus_per_client: int
    num_gpus_per_client: float
    ray_address: str | None


@dataclass
class AppConfig:
    dataset: DatasetConfig
    partitioner: PartitionerConfig
    model: ModelConfig
    strategy: StrategyConfig
    mode: ModeConfig
    num_rounds: int
    num_clients: int
    fraction_fit: float
    fraction_evaluate: float
    min_fit_clients: int
    min_evaluate_clients: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    loss: str
    eval_every: int
    eval_batch_size: int
    target_accuracy: float | None
    seed: int
    output_dir: str | None
    resume: bool

    def __post_init__(self) -> None:
        validate(self)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"got {value!r}, must be one of {', '.join(allowed)}")


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(key, f"got {value!r}, must be an integer >= {minimum}")


def _fraction(key: str, value: float, allow_zero: bool) -> None:
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(key, f"got {value!r}, must be a number in {interval}")


def validate(cfg: AppConfig) -> None:
    """Raise `ConfigError` for the first invalid value of `cfg`."""
    _one_of("dataset.name", cfg.dataset.name, DATASETS)
    _one_of("partitioner.name", cfg.partitioner.name, PARTITIONERS)
    _one_of("model.name", cfg.model.name, MODELS)
    _one_of("strategy.name", cfg.strategy.name, STRATEGIES)
    _one_of("mode.name", cfg.mode.name, MODES)
    _one_of("optimizer", cfg.optimizer, OPTIMIZERS)
    _one_of("loss", cfg.loss, LOSSES)
    for key in ("num_rounds", "num_clients", "local_epochs", "batch_size", "eval_every",
                "eval_batch_size"):
        _at_least(key, getattr(cfg, key), 1)
    _at_least("min_fit_clients", cfg.min_fit_clients, 1)
    _at_least("min_evaluate_clients", cfg.min_evaluate_clients, 0)
    _at_least("mode.num_cpus_per_client", cfg.mode.num_cpus_per_client, 1)
    _fraction("fraction_fit", cfg.fraction_fit, allow_zero=False)
    _fraction("fraction_evaluate", cfg.fraction_evaluate, allow_zero=True)
    _fraction("dataset.val_fraction", cfg.dataset.val_fraction, allow_zero=False)
    if cfg.dataset.val_fraction >= 1.0:
        raise ConfigError("dataset.val_fraction", f"got {cfg.dataset.val_fraction}, must be < 1")
    if cfg.learning_rate <= 0:
        raise ConfigError("learning_rate", f"got {cfg.learning_rate}, must be a number > 0")
    if cfg.mode.num_gpus_per_client < 0:
        raise ConfigError(
            "mode.num_gpus_per_client", f"got {cfg.mode.num_gpus_per_client}, must be >= 0"
        )
    for key in ("min_fit_clients", "min_evaluate_clients"):
        if getattr(cfg, key) > cfg.num_clients:
            raise ConfigError(
                key, f"got {getattr(cfg, key)}, must be <= num_clients ({cfg.num_clients})"
            )
    if cfg.target_accuracy is not None:
        _fraction("target_accuracy", cfg.target_accuracy, allow_zero=False)
    if cfg.resume and not cfg.output_dir:
        raise ConfigError("output_dir", "must name the run to continue when resume=true")
