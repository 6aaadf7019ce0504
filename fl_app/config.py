"""The one place where Hydra's composed config meets Flower's run config.

Both doors end in the same validated `AppConfig`:
- `python run_simulation.py k=v ...`: Hydra composes `conf/` and `to_simulation_config` checks it;
- `flwr run . --run-config 'overrides="k=v ..."'`: Flower hands the ServerApp and each
  ClientApp the run config, and `from_run_config` composes `conf/` with those overrides.
Flower's run config only holds flat scalars declared in pyproject.toml, so it carries the
Hydra override string rather than a copy of every key.
"""

import dataclasses
import shlex
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fl_app.config_schema import AppConfig, ConfigError
from fl_app.task import check_model_fits, settle

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
OVERRIDES_KEY = "overrides"

ConfigStore.instance().store(name="base_config", node=AppConfig)


def to_app_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> AppConfig:
    """Resolve and validate a composed config, settling an image-folder task from its
    folders (`fl_app.task.settle`); raises `ConfigError` on a bad value, `DatasetError` on
    a bad folder. `overrides`: the Hydra overrides it was composed with."""
    try:
        # Re-merging into the schema rejects keys that Hydra's `+key=value` appended.
        typed = OmegaConf.merge(AppConfig, OmegaConf.to_container(cfg))
        app_cfg = OmegaConf.to_object(typed)
    except ConfigKeyError as err:
        known = ", ".join(f.name for f in dataclasses.fields(err.object_type))
        raise ConfigError(err.full_key, f"no such key; known keys here: {known}") from None
    except OmegaConfBaseException as err:
        # OmegaConf wraps errors raised in __post_init__; surface ours unchanged.
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise
    assert isinstance(app_cfg, AppConfig)
    # Workers may run in another working directory: pin the data folders and files now.
    dataset = app_cfg.dataset
    for key in ("data_dir", "clients_dir", "train_dir", "test_dir"):
        if getattr(dataset, key):
            setattr(dataset, key, _absolute(getattr(dataset, key)))
    if app_cfg.init_from:
        app_cfg.init_from = _absolute(app_cfg.init_from)
    if app_cfg.model.weights not in (None, "imagenet"):
        app_cfg.model.weights = _absolute(app_cfg.model.weights)
    settled = settle(app_cfg, num_clients_given="num_clients" in override_keys(overrides))
    check_model_fits(settled)
    return settled


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def to_simulation_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> AppConfig:
    """`to_app_config` for `run_simulation.py` (each job of a sweep too): mode=simulation only."""
    app_cfg = to_app_config(cfg, overrides)
    if app_cfg.mode.name != "simulation":
        raise ConfigError(
            "mode",
            f"run_simulation.py runs mode=simulation only; a {app_cfg.mode.name} run is "
            "submitted with `flwr run . <connection>` (docs/deployment.md)",
        )
    return app_cfg


def compose_config(overrides: list[str] | None = None) -> AppConfig:
    """Compose `conf/config.yaml` with Hydra override strings, outside `@hydra.main`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides or [])
    return to_app_config(cfg, overrides or [])


def from_run_config(run_config: Mapping[str, object]) -> AppConfig:
    """The config of a `flwr run`: `conf/` plus the run config's Hydra overrides."""
    return _compose_overrides(str(run_config.get(OVERRIDES_KEY, "")))


def given_keys(run_config: Mapping[str, object]) -> set[str]:
    """The config keys that a `flwr run`'s overrides set."""
    return override_keys(shlex.split(str(run_config.get(OVERRIDES_KEY, ""))))


def override_keys(overrides: Sequence[str]) -> set[str]:
    """The config keys that Hydra overrides set (`num_clients=3` -> num_clients), as
    Hydra's own parser reads them."""
    return {override.key_or_group for override in OverridesParser.create().parse_overrides(list(overrides))}


@lru_cache(maxsize=4)
def _compose_overrides(overrides: str) -> AppConfig:
    # Composed once per process and override string, not once per client call.
    return compose_config(shlex.split(overrides))
