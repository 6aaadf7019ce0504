"""Typed schema of the Hydra configuration, with the value checks types cannot express.

Hydra merges `conf/*.yaml` into these dataclasses, so unknown keys and wrong types are
rejected while composing. `AppConfig.__post_init__` then checks values and relations
(ranges, known names, `min_fit_clients <= num_clients`), so every way of building a
config (Hydra CLI, `flwr run`, tests) fails before any training with a message naming
the key and what is allowed. This module imports nothing of ours on purpose.
"""

from dataclasses import dataclass, fields

BUILT_IN_DATASETS = ("mnist", "fashion_mnist", "cifar10")
IMAGE_FOLDER = "image_folder"  # the user's own task: conf/dataset/image_folder.yaml
DATASETS = (*BUILT_IN_DATASETS, IMAGE_FOLDER)
# The settings of an image-folder task; the built-in datasets fix them, so take none.
IMAGE_FOLDER_SETTINGS = ("classes", "image_size", "channels", "clients_dir", "train_dir", "test_dir")


@dataclass(frozen=True)
class ModelSpec:
    """A model of conf/model/: whether it is a pretrained network's backbone under a new
    head (keras.applications), which can start from pretrained weights and train its head
    alone, and the smallest image side it takes."""

    backbone: bool = False
    min_image_size: int = 1


MODELS = {
    "seed_cnn": ModelSpec(),
    "mcmahan_cnn": ModelSpec(),
    "mcmahan_2nn": ModelSpec(),
    "mobilenet_v3_small": ModelSpec(backbone=True, min_image_size=32),
    "efficientnet_b0": ModelSpec(backbone=True, min_image_size=32),
}
TRAINED_PARTS = ("all", "head")  # model.train
AUGMENTATIONS = ("none", "light")
# Each partitioner and the settings it takes (any other must stay unset).
PARTITIONERS = {
    "iid": (),
    "pathological": ("shards_per_client",),
    "dirichlet": ("alpha", "min_partition_size"),
    "quantity_skew": ("alpha", "min_partition_size"),
}


@dataclass(frozen=True)
class StrategySpec:
    """A strategy of conf/strategy/: Flower's class (in flwr.server.strategy), the settings
    it takes (its keyword arguments; any other must stay unset), and whether its worth is in
    how it weighs single updates (robust), which central DP cannot give it."""

    flower_class: str
    settings: tuple[str, ...] = ()
    robust: bool = False


# Adding a strategy: a line here and its conf/strategy/<name>.yaml.
STRATEGIES = {
    "fedavg": StrategySpec("FedAvg"),
    "fedavgm": StrategySpec("FedAvgM", ("server_learning_rate", "server_momentum")),
    "fedprox": StrategySpec("FedProx", ("proximal_mu",)),
    "fedadam": StrategySpec("FedAdam", ("eta", "beta_1", "beta_2", "tau")),
    "fedyogi": StrategySpec("FedYogi", ("eta", "beta_1", "beta_2", "tau")),
    "fedadagrad": StrategySpec("FedAdagrad", ("eta", "tau")),
    "fedmedian": StrategySpec("FedMedian", robust=True),
    "fedtrimmedavg": StrategySpec("FedTrimmedAvg", ("beta",), robust=True),
    "krum": StrategySpec("Krum", ("num_malicious_clients", "num_clients_to_keep"), robust=True),
}
MODES = ("simulation", "deployment")
SIMULATION_ONLY = ("num_gpus_per_client", "ray_address")  # mode settings of the Ray engine
CENTRAL_DP = ("server_fixed", "client_fixed")  # noise on the sum
DP_MODES = ("none", *CENTRAL_DP, "local")
# Flower 1.42's adaptive clipping wrappers, refused with the reason (docs/privacy.md).
ADAPTIVE_DP = ("server_adaptive", "client_adaptive")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("sparse_categorical_crossentropy",)


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what is allowed."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"Invalid config key '{key}': {problem}")
        self.key = key


# No defaults here: conf/*.yaml is the one place that sets (and documents) values.
# The only exception: a partitioner's or strategy's own settings are None (unset) unless
# its conf file sets them, since each one takes different settings.


@dataclass
class DatasetConfig:
    name: str
    data_dir: str  # the built-in datasets' root folder
    val_fraction: float
    # dataset image_folder only (IMAGE_FOLDER_SETTINGS; conf/dataset/image_folder.yaml)
    classes: list[str] | None = None
    image_size: list[int] | None = None  # [height, width]
    channels: int | None = None
    clients_dir: str | None = None
    train_dir: str | None = None
    test_dir: str | None = None


@dataclass
class PartitionerConfig:
    name: str
    alpha: float | None = None  # Dirichlet concentration: smaller is more skewed
    min_partition_size: int | None = None
    shards_per_client: int | None = None


@dataclass
class ModelConfig:
    name: str
    weights: str | None  # backbone models: imagenet, a weights file of the backbone, or null (random)
    train: str  # all: every weight trains and travels; head: the backbone is frozen, only the head travels


@dataclass
class StrategyConfig:
    """Settings named as the keyword arguments of Flower's strategy classes."""

    name: str
    server_learning_rate: float | None = None
    server_momentum: float | None = None
    proximal_mu: float | None = None
    eta: float | None = None
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None
    beta: float | None = None
    num_malicious_clients: int | None = None
    num_clients_to_keep: int | None = None


@dataclass
class ModeConfig:
    """simulation: Flower's Ray engine on this machine; deployment: real SuperNodes."""

    name: str
    num_cpus_per_client: int  # TensorFlow threads of each client (and its Ray CPUs)
    num_gpus_per_client: float | None = None  # simulation only
    ray_address: str | None = None  # simulation only; None there: a private Ray


@dataclass
class PrivacyConfig:
    """Secure aggregation (Flower's SecAgg+) and differential privacy (Flower's DP
    wrappers and mods); conf/privacy/none.yaml documents every key."""

    secagg: bool
    dp: str
    noise_multiplier: float
    clipping_norm: float
    delta: float
    target_epsilon: float | None
    local_epsilon: float
    secagg_num_shares: int
    secagg_reconstruction_threshold: int
    secagg_clipping_range: float
    secagg_quantization_range: int
    secagg_max_weight: float
    secagg_timeout: float | None


@dataclass
class AppConfig:
    dataset: DatasetConfig
    partitioner: PartitionerConfig
    model: ModelConfig
    strategy: StrategyConfig
    mode: ModeConfig
    privacy: PrivacyConfig
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
    steps_per_execution: int
    target_accuracy: float | None
    round_timeout: float | None
    seed: int
    verbose: bool
    output_dir: str | None
    resume: bool
    init_from: str | None
    augment: str

    def __post_init__(self) -> None:
        validate(self)


def own_settings(section: PartitionerConfig | StrategyConfig) -> dict[str, float | int]:
    """The settings a partitioner or strategy takes: the keys its conf file sets."""
    return {f.name: getattr(section, f.name) for f in fields(section)
            if f.name != "name" and getattr(section, f.name) is not None}


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


def _settings_match(group: str, section, allowed: dict[str, tuple[str, ...]]) -> None:
    """Each setting that `section.name` takes is set, and no other is."""
    _one_of(f"{group}.name", section.name, tuple(allowed))
    takes = allowed[section.name]
    for field in fields(section):
        value = getattr(section, field.name)
        if field.name == "name" or (value is None) != (field.name in takes):
            continue
        key = f"{group}.{field.name}"
        if value is None:
            raise ConfigError(key, f"{group} {section.name} needs it (a number)")
        settings = ", ".join(takes) or "none"
        raise ConfigError(key, f"does not apply to {group} {section.name} (its settings: {settings})")


def _in_range(key: str, value: float | None, low: float, high: float, closed: str = "[)") -> None:
    """value in the interval [low, high) (or as `closed` says), when it is set."""
    if value is None:
        return
    above = value >= low if closed[0] == "[" else value > low
    below = value <= high if closed[1] == "]" else value < high
    if not (above and below):
        raise ConfigError(key, f"got {value!r}, must be in {closed[0]}{low}, {high}{closed[1]}")


def _check_settings(cfg: AppConfig) -> None:
    _settings_match("partitioner", cfg.partitioner, PARTITIONERS)
    _settings_match("strategy", cfg.strategy, {name: spec.settings for name, spec in STRATEGIES.items()})
    inf = float("inf")
    part, strat = cfg.partitioner, cfg.strategy
    _in_range("partitioner.alpha", part.alpha, 0, inf, "()")
    _in_range("partitioner.min_partition_size", part.min_partition_size, 1, inf)
    _in_range("partitioner.shards_per_client", part.shards_per_client, 1, inf)
    _in_range("strategy.server_learning_rate", strat.server_learning_rate, 0, inf, "()")
    _in_range("strategy.server_momentum", strat.server_momentum, 0, 1)
    _in_range("strategy.proximal_mu", strat.proximal_mu, 0, inf)
    _in_range("strategy.eta", strat.eta, 0, inf, "()")
    _in_range("strategy.beta_1", strat.beta_1, 0, 1)
    _in_range("strategy.beta_2", strat.beta_2, 0, 1)
    _in_range("strategy.tau", strat.tau, 0, inf, "()")
    _in_range("strategy.beta", strat.beta, 0, 0.5, "()")
    _in_range("strategy.num_malicious_clients", strat.num_malicious_clients, 0, inf)
    _in_range("strategy.num_clients_to_keep", strat.num_clients_to_keep, 0, inf)


def _check_mode(mode: ModeConfig) -> None:
    if mode.name == "deployment":
        for key in SIMULATION_ONLY:
            if getattr(mode, key) is not None:
                raise ConfigError(f"mode.{key}", "applies to mode simulation only; remove it")
    elif mode.num_gpus_per_client is None or mode.num_gpus_per_client < 0:
        raise ConfigError(
            "mode.num_gpus_per_client", f"got {mode.num_gpus_per_client}, must be a number >= 0"
        )


def _check_privacy(cfg: AppConfig) -> None:
    privacy = cfg.privacy
    if privacy.dp in ADAPTIVE_DP:
        raise ConfigError("privacy.dp", f"{privacy.dp} is not offered: Flower 1.42's adaptive "
                          "clipping moves its norm away from the target quantile and scales the "
                          "noise by the next round's norm, not the one it clipped to (see "
                          "docs/privacy.md); use server_fixed or client_fixed")
    _one_of("privacy.dp", privacy.dp, DP_MODES)
    inf = float("inf")
    _in_range("privacy.noise_multiplier", privacy.noise_multiplier, 0, inf, "()")
    _in_range("privacy.clipping_norm", privacy.clipping_norm, 0, inf, "()")
    _in_range("privacy.delta", privacy.delta, 0, 1, "()")
    _in_range("privacy.target_epsilon", privacy.target_epsilon, 0, inf, "()")
    _in_range("privacy.local_epsilon", privacy.local_epsilon, 0, inf, "()")
    if privacy.dp in CENTRAL_DP and STRATEGIES[cfg.strategy.name].robust:
        averaging = ", ".join(name for name, spec in STRATEGIES.items() if not spec.robust)
        raise ConfigError("strategy.name", f"got {cfg.strategy.name}, which weighs single updates, but central DP "
                          f"gives the strategy only their noised average; use one of {averaging}")
    if privacy.target_epsilon is not None and privacy.dp not in CENTRAL_DP:
        raise ConfigError("privacy.target_epsilon", "needs central DP (privacy.dp server_* or "
                          f"client_*), got privacy.dp={privacy.dp}")
    if not privacy.secagg:
        return
    if privacy.dp.startswith("server_"):
        raise ConfigError("privacy.dp", f"got {privacy.dp}, but with SecAgg+ the server never sees "
                          "one client's update to clip it: use client_fixed")
    _in_range("privacy.secagg_num_shares", privacy.secagg_num_shares, 3, inf)
    _in_range("privacy.secagg_reconstruction_threshold", privacy.secagg_reconstruction_threshold,
              2, privacy.secagg_num_shares)
    _in_range("privacy.secagg_clipping_range", privacy.secagg_clipping_range, 0, inf, "()")
    _in_range("privacy.secagg_quantization_range", privacy.secagg_quantization_range, 2, 2**31)
    _in_range("privacy.secagg_max_weight", privacy.secagg_max_weight, 0, inf, "()")
    if privacy.dp in CENTRAL_DP and privacy.secagg_max_weight != 1:
        # Under central DP each client reports weight 1, which SecAgg+ quantises as
        # 1 / max_weight: a larger max_weight rounds every update away.
        raise ConfigError("privacy.secagg_max_weight", f"got {privacy.secagg_max_weight}, must be 1 "
                          f"with central DP (privacy.dp={privacy.dp}): each client counts once")
    _in_range("privacy.secagg_timeout", privacy.secagg_timeout, 0, inf, "()")
    if cfg.min_fit_clients < privacy.secagg_reconstruction_threshold:
        raise ConfigError("min_fit_clients", f"got {cfg.min_fit_clients}, must be >= "
                          f"privacy.secagg_reconstruction_threshold "
                          f"({privacy.secagg_reconstruction_threshold}) with SecAgg+")


def _check_model(cfg: AppConfig) -> None:
    model = cfg.model
    _one_of("model.name", model.name, tuple(MODELS))
    _one_of("model.train", model.train, TRAINED_PARTS)
    _one_of("augment", cfg.augment, AUGMENTATIONS)
    backbones = ", ".join(name for name, spec in MODELS.items() if spec.backbone)
    if not MODELS[model.name].backbone:
        if model.train != "all":
            raise ConfigError("model.train", f"got {model.train}, but {model.name} has no pretrained backbone "
                              f"to freeze; use all, or a backbone model: {backbones}")
        if model.weights is not None:
            raise ConfigError("model.weights", f"got {model.weights!r}, but {model.name} has no pretrained "
                              f"backbone; leave it null, or use a backbone model: {backbones}")


def _check_image_folder(dataset: DatasetConfig, mode: str) -> None:
    """An image-folder task's classes, image settings, and (simulation) where its images are."""
    if dataset.classes is not None:
        if len(dataset.classes) < 2:
            raise ConfigError("dataset.classes", f"got {dataset.classes}: a classifier needs at least 2 classes")
        empty = [name for name in dataset.classes if not str(name).strip()]
        if empty:
            raise ConfigError("dataset.classes", f"got {dataset.classes}: class names must not be empty")
        repeated = sorted({name for name in dataset.classes if dataset.classes.count(name) > 1})
        if repeated:
            raise ConfigError("dataset.classes", f"names {', '.join(repeated)} more than once; each class once")
    if dataset.image_size is None or len(dataset.image_size) != 2 or min(dataset.image_size) < 1:
        raise ConfigError("dataset.image_size", f"got {dataset.image_size}, must be [height, width] "
                          "in pixels, each >= 1")
    if dataset.channels not in (1, 3):
        raise ConfigError("dataset.channels", f"got {dataset.channels}, must be 1 (grey) or 3 (RGB)")
    given = [key for key in ("clients_dir", "train_dir") if getattr(dataset, key)]
    if mode == "deployment":
        if given:
            raise ConfigError(f"dataset.{given[0]}", "applies to mode simulation only: in deployment "
                              "each partner's SuperNode names its own folder (node config image-dir)")
        if dataset.classes is None:
            raise ConfigError("dataset.classes", "must list the class names in deployment: the "
                              "server sees no images to read them from")
    elif len(given) != 1:
        raise ConfigError("dataset.clients_dir / dataset.train_dir", f"got {'both' if given else 'neither'}; "
                          "give exactly one: clients_dir (one sub-folder per party) or train_dir "
                          "(one pooled folder that the partitioner splits over num_clients)")


def _check_dataset(cfg: AppConfig) -> None:
    _one_of("dataset.name", cfg.dataset.name, DATASETS)
    if cfg.dataset.name == IMAGE_FOLDER:
        _check_image_folder(cfg.dataset, cfg.mode.name)
        return
    for key in IMAGE_FOLDER_SETTINGS:
        if getattr(cfg.dataset, key) is not None:
            raise ConfigError(f"dataset.{key}", f"does not apply to dataset {cfg.dataset.name}, whose "
                              f"classes and images are fixed; it is a setting of dataset={IMAGE_FOLDER}")


def validate(cfg: AppConfig) -> None:
    """Raise `ConfigError` for the first invalid value of `cfg`."""
    _check_model(cfg)
    _check_settings(cfg)
    _one_of("mode.name", cfg.mode.name, MODES)
    _one_of("optimizer", cfg.optimizer, OPTIMIZERS)
    _one_of("loss", cfg.loss, LOSSES)
    for key in ("num_rounds", "num_clients", "local_epochs", "batch_size", "eval_every",
                "eval_batch_size", "steps_per_execution"):
        _at_least(key, getattr(cfg, key), 1)
    _at_least("min_fit_clients", cfg.min_fit_clients, 1)
    _at_least("min_evaluate_clients", cfg.min_evaluate_clients, 0)
    _at_least("mode.num_cpus_per_client", cfg.mode.num_cpus_per_client, 1)
    _fraction("fraction_fit", cfg.fraction_fit, allow_zero=False)
    _fraction("fraction_evaluate", cfg.fraction_evaluate, allow_zero=True)
    _fraction("dataset.val_fraction", cfg.dataset.val_fraction, allow_zero=True)
    if cfg.dataset.val_fraction >= 1.0:
        raise ConfigError("dataset.val_fraction", f"got {cfg.dataset.val_fraction}, must be < 1")
    if cfg.learning_rate <= 0:
        raise ConfigError("learning_rate", f"got {cfg.learning_rate}, must be a number > 0")
    _check_mode(cfg.mode)
    _check_dataset(cfg)
    _check_privacy(cfg)
    for key in ("min_fit_clients", "min_evaluate_clients"):
        if getattr(cfg, key) > cfg.num_clients:
            raise ConfigError(
                key, f"got {getattr(cfg, key)}, must be <= num_clients ({cfg.num_clients})"
            )
    if cfg.dataset.val_fraction == 0 and cfg.fraction_evaluate > 0:
        raise ConfigError(
            "fraction_evaluate",
            f"got {cfg.fraction_evaluate}, must be 0 when dataset.val_fraction is 0 "
            "(clients then hold no held-out data to evaluate on)",
        )
    if cfg.target_accuracy is not None:
        _fraction("target_accuracy", cfg.target_accuracy, allow_zero=False)
    if cfg.round_timeout is not None and cfg.round_timeout <= 0:
        raise ConfigError("round_timeout", f"got {cfg.round_timeout}, must be null or seconds > 0")
    if cfg.resume and not cfg.output_dir:
        raise ConfigError("output_dir", "must name the run to continue when resume=true")
