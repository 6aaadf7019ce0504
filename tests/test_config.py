"""Config validation: every bad value fails before training, naming the key and what is allowed."""

import pytest
from conftest import run_simulation_cli
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from fl_app.config import compose_config, from_run_config
from fl_app.config_schema import ConfigError


def test_defaults_are_the_documented_main_job():
    cfg = compose_config()
    assert (cfg.num_clients, cfg.num_rounds, cfg.local_epochs) == (10, 10, 1)
    assert (cfg.dataset.name, cfg.model.name, cfg.strategy.name, cfg.mode.name) == (
        "mnist", "seed_cnn", "fedavg", "simulation"
    )


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("num_clients=0", "num_clients", ">= 1"),
        ("num_rounds=-1", "num_rounds", ">= 1"),
        ("fraction_fit=1.5", "fraction_fit", "(0, 1]"),
        ("fraction_fit=0", "fraction_fit", "(0, 1]"),
        ("fraction_evaluate=-0.1", "fraction_evaluate", "[0, 1]"),
        ("min_fit_clients=11", "min_fit_clients", "<= num_clients (10)"),
        ("batch_size=0", "batch_size", ">= 1"),
        ("eval_every=0", "eval_every", ">= 1"),
        ("learning_rate=0", "learning_rate", "> 0"),
        ("optimizer=rmsprop", "optimizer", "sgd, adam"),
        ("dataset.name=cifar", "dataset.name", "mnist, fashion_mnist"),
        ("model.name=resnet", "model.name", "seed_cnn"),
        ("dataset.val_fraction=1.0", "dataset.val_fraction", "< 1"),
        ("+unknown_key=1", "unknown_key", "known keys here: dataset"),
        ("+dataset.colour=1", "dataset.colour", "known keys here: name, data_dir"),
    ],
)
def test_bad_value_names_key_and_allowed_values(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert err.value.key == key
    assert f"'{key}'" in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize(
    "override, text",
    [
        ("dataset=imagenet", "Available options in 'dataset'"),
        ("model=vgg", "Available options in 'model'"),
        ("num_clients=ten", "num_clients"),
        ("unknown_key=1", "unknown_key"),
    ],
)
def test_hydra_rejects_unknown_groups_types_and_keys(override, text):
    with pytest.raises((HydraException, OmegaConfBaseException)) as err:
        compose_config([override])
    assert text in str(err.value)


def test_flwr_run_config_reaches_the_same_config():
    via_flwr = from_run_config({"overrides": "num_rounds=3 dataset=fashion_mnist seed=7"})
    assert via_flwr == compose_config(["num_rounds=3", "dataset=fashion_mnist", "seed=7"])


def test_cli_fails_before_training_and_writes_only_the_log(tmp_path):
    run_dir = tmp_path / "run"
    result = run_simulation_cli("fraction_fit=1.5", f"hydra.run.dir={run_dir}", timeout=120)
    assert result.returncode != 0
    assert "fraction_fit" in result.stdout + result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["run_simulation.log"]


def test_cli_rejects_unknown_dataset_group(tmp_path):
    result = run_simulation_cli("dataset=imagenet", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode != 0
    assert "fashion_mnist" in result.stderr and "mnist" in result.stderr


def test_cli_help_lists_groups_and_keys():
    result = run_simulation_cli("--help", timeout=120)
    assert result.returncode == 0
    for text in ("dataset: fashion_mnist, mnist", "num_clients", "fraction_fit", "resume"):
        assert text in result.stdout, text
