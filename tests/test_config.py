"""Config validation: every bad value fails before training, naming the key and what is allowed."""

import re

import pytest
from conftest import run_simulation_cli
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from fl_app.config import compose_config, from_run_config, given_keys
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
        ("steps_per_execution=0", "steps_per_execution", ">= 1"),
        ("learning_rate=0", "learning_rate", "> 0"),
        ("optimizer=rmsprop", "optimizer", "sgd, adam"),
        ("dataset.name=cifar", "dataset.name", "mnist, fashion_mnist, cifar10"),
        ("model.name=resnet", "model.name", "seed_cnn, mcmahan_cnn, mcmahan_2nn"),
        ("strategy.name=fedfoo", "strategy.name", "fedavg, fedavgm, fedprox"),
        ("partitioner.name=natural", "partitioner.name", "iid, pathological, dirichlet"),
        ("+partitioner.alpha=0.1", "partitioner.alpha", "does not apply to partitioner iid"),
        ("strategy.name=fedprox", "strategy.proximal_mu", "strategy fedprox needs it"),
        ("target_accuracy=1.5", "target_accuracy", "(0, 1]"),
        ("round_timeout=0", "round_timeout", "null or seconds > 0"),
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
    "overrides, key, allowed",
    [
        (["partitioner=dirichlet", "partitioner.alpha=0"], "partitioner.alpha", "(0, inf)"),
        (["partitioner=pathological", "partitioner.shards_per_client=0"],
         "partitioner.shards_per_client", "[1, inf)"),
        (["partitioner=dirichlet", "partitioner.shards_per_client=2"], "partitioner.shards_per_client",
         "its settings: alpha, min_partition_size"),
        (["strategy=fedprox", "strategy.proximal_mu=-1"], "strategy.proximal_mu", "[0, inf)"),
        (["strategy=fedavgm", "strategy.server_momentum=1"], "strategy.server_momentum", "[0, 1)"),
        (["strategy=fedtrimmedavg", "strategy.beta=0.5"], "strategy.beta", "(0, 0.5)"),
        (["strategy=fedadam", "strategy.proximal_mu=0.1"], "strategy.proximal_mu",
         "does not apply to strategy fedadam"),
        (["mode=deployment", "+mode.ray_address=auto"], "mode.ray_address", "simulation only"),
        (["mode.num_gpus_per_client=-1"], "mode.num_gpus_per_client", ">= 0"),
    ],
)
def test_bad_partitioner_or_strategy_setting_names_key(overrides, key, allowed):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
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


def test_deployment_mode_composes_and_run_simulation_refuses_it(tmp_path):
    cfg = compose_config(["mode=deployment"])
    assert (cfg.mode.name, cfg.mode.ray_address, cfg.mode.num_gpus_per_client) == ("deployment", None, None)
    result = run_simulation_cli("mode=deployment", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    assert "flwr run . <connection>" in result.stdout + result.stderr


def test_cli_rejects_unknown_dataset_group(tmp_path):
    result = run_simulation_cli("dataset=imagenet", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode != 0
    assert "Could not find 'dataset/imagenet'" in result.stderr
    for option in ("cifar10", "fashion_mnist", "mnist"):  # each on a line of its own
        assert re.search(rf"^\s*{option}$", result.stderr, re.MULTILINE), option


def test_cli_help_lists_groups_and_keys():
    result = run_simulation_cli("--help", timeout=120)
    assert result.returncode == 0
    for text in ("dataset: cifar10, fashion_mnist, image_folder, mnist", "strategy: fedadagrad, fedadam",
                 "partitioner: dirichlet, iid, pathological, quantity_skew", "num_clients", "fraction_fit", "resume"):
        assert text in result.stdout, text


def test_the_keys_a_flwr_run_overrides():
    overrides = {"overrides": "num_clients=10 +privacy.extra=1 ~seed 'output_dir=/runs/a b'"}
    assert given_keys(overrides) == {"num_clients", "privacy.extra", "seed", "output_dir"}
    assert given_keys({}) == set()
