"""Differential privacy (Flower's wrappers and mods, our privacy budget) and SecAgg+
(Flower's workflow and mod), on real Flower objects and real simulations."""

import dataclasses
import json
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import REPO, run_simulation_cli
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common import Code, FitIns, FitRes, Metadata, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat
from flwr.server import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg

from fl_app import model as keras_model
from fl_app.client_app import build_client_app
from fl_app.config import compose_config
from fl_app.config_schema import ConfigError
from fl_app.privacy import PrivacyBudget, with_central_dp
from fl_app.strategy import build_strategy


def central_dp_round(shapes, num_clients, noise_multiplier, clipping_norm, dp="server_fixed",
                     initial=None, **common):
    """A FedAvg round (zeros, or `initial` weights) wrapped in Flower's central-DP wrapper
    `dp`, configured for `num_clients`: the strategy, the clients, their fit instructions."""
    privacy = dataclasses.replace(compose_config(["privacy=central_dp"]).privacy, dp=dp,
                                  noise_multiplier=noise_multiplier, clipping_norm=clipping_norm)
    initial = initial or [np.zeros(shape, np.float32) for shape in shapes]
    strategy = build_strategy("fedavg", {}, initial, min_fit_clients=num_clients,
                              min_available_clients=num_clients, equal_weights=True,
                              wrap=lambda inner: with_central_dp(inner, privacy, num_clients), **common)
    proxies = [GridClientProxy(node_id=i + 1, grid=None, run_id=0) for i in range(num_clients)]
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(initial), connected(proxies))
    return strategy, proxies, [fit_ins for _, fit_ins in instructions]


def connected(proxies):
    manager = SimpleClientManager()
    for proxy in proxies:
        manager.register(proxy)
    return manager


def fit_result(proxy, arrays, num_examples):
    return proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, {})


def test_server_side_clipping_bounds_each_update_and_weighs_clients_equally():
    strategy, proxies, _ = central_dp_round([(3,), (4,)], 2, noise_multiplier=0.0, clipping_norm=1.0)
    big = [np.full(3, 10.0, np.float32), np.full(4, 10.0, np.float32)]  # norm ~26: clipped to 1
    small = [np.full(3, 0.1, np.float32), np.full(4, 0.1, np.float32)]  # norm ~0.26: kept
    parameters, _ = strategy.aggregate_fit(1, [fit_result(proxies[0], big, 5000),
                                               fit_result(proxies[1], small, 10)], [])
    clipped_big = [a / np.sqrt(7 * 100.0) for a in big]
    # Equal weights: examples (5000 vs 10) do not count under DP.
    for got, a, b in zip(parameters_to_ndarrays(parameters), clipped_big, small):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-5)


def test_noise_std_is_noise_multiplier_times_clip_over_sampled_clients():
    np.random.seed(0)  # Flower draws the noise from NumPy's global generator
    strategy, proxies, _ = central_dp_round([(200_000,)], 10, noise_multiplier=1.5, clipping_norm=2.0)
    # Every client moves every weight by 0.001 (norm 0.45 < clip: not clipped).
    same = [np.full(200_000, 0.001, np.float32)]
    parameters, _ = strategy.aggregate_fit(1, [fit_result(p, same, 100) for p in proxies], [])
    noise = parameters_to_ndarrays(parameters)[0] - 0.001
    assert abs(noise.mean()) < 0.003
    # 1.5 x 2.0 / 10 = 0.3; the std of 200,000 draws is within 1 % of it (about 6 standard errors).
    assert noise.std() == pytest.approx(0.3, rel=0.01)


def test_flowers_adaptive_clipping_steps_away_from_its_target():
    """Why fl_app refuses privacy.dp=*_adaptive (docs/privacy.md). If this fails, a Flower
    release has fixed its adaptive clipping, and the modes can be offered again."""
    np.random.seed(0)  # Flower noises the clipped count from NumPy's global generator
    zeros, tiny = [np.zeros(4, np.float32)], [np.full(4, 0.01, np.float32)]
    wrapper = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(min_fit_clients=10, min_available_clients=10), noise_multiplier=0.1,
        num_sampled_clients=10, initial_clipping_norm=1.0)
    proxies = [GridClientProxy(node_id=i + 1, grid=None, run_id=0) for i in range(10)]
    wrapper.configure_fit(1, ndarrays_to_parameters(zeros), connected(proxies))
    wrapper.aggregate_fit(1, [fit_result(p, tiny, 1) for p in proxies], [])
    # No update (norm 0.02) was clipped at 1.0. Andrew et al.'s rule at Flower's defaults
    # (target quantile 0.5, rate 0.2) shrinks the norm by exp(-0.2 x 0.5) = 0.905; Flower's grows it.
    assert wrapper.clipping_norm > 1.0


PARTY = {"partition-id": 0, "num-partitions": 20}


def client_reply(privacy_overrides, fit_ins):
    """Our ClientApp, with the privacy mods the config selects, answering `fit_ins` on
    MNIST partition 0 of 20: the weights sent and the FitRes returned."""
    cfg = compose_config(["num_clients=20", *privacy_overrides])
    # As the SuperLink delivers it: a training message from the server (node 0) to node 1.
    metadata = Metadata(run_id=1, message_id="1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=600, message_type=MessageType.TRAIN)
    message = Message(recorddict_compat.fitins_to_recorddict(fit_ins, keep_input=True), metadata=metadata)
    context = Context(run_id=1, node_id=1, node_config=PARTY, state=RecordDict(), run_config={})
    reply = build_client_app(cfg)(message, context)
    assert not reply.has_error(), reply.error
    return (parameters_to_ndarrays(fit_ins.parameters),
            recorddict_compat.recorddict_to_fitres(reply.content, keep_input=False))


def seed_cnn_weights():
    return keras_model.initial_weights("seed_cnn", (28, 28, 1), seed=0)


FIT_CONFIG = {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.1}


def test_client_side_clipping_bounds_the_update_and_counts_the_client_once():
    clip = 0.05  # one epoch at lr 0.1 moves the seed CNN much further than this
    # Flower's client-side DP wrapper sends the clipping norm with the fit instructions.
    *_, (fit_ins,) = central_dp_round(None, 1, noise_multiplier=0.1, clipping_norm=clip,
                                      dp="client_fixed", initial=seed_cnn_weights(),
                                      on_fit_config_fn=lambda r: {"server_round": r, **FIT_CONFIG})
    sent, res = client_reply(["privacy=client_dp"], fit_ins)
    norm = np.sqrt(sum(np.sum((b - a).astype(np.float64) ** 2)
                       for a, b in zip(sent, parameters_to_ndarrays(res.parameters))))
    assert 0 < norm <= clip * (1 + 1e-5), norm
    # Central DP: the client counts once in the average and reports its real count apart.
    assert res.num_examples == 1 and res.metrics["num_examples"] > 2000


def test_local_dp_clips_then_adds_the_gaussian_noise_it_states():
    fit_ins_config = {"server_round": 1, **FIT_CONFIG}
    sent_ins = FitIns(ndarrays_to_parameters(seed_cnn_weights()), fit_ins_config)
    sent, res = client_reply(["privacy=local_dp", "privacy.clipping_norm=0.1",
                              "privacy.local_epsilon=10"], sent_ins)
    change = np.concatenate([(b - a).ravel() for a, b in zip(sent, parameters_to_ndarrays(res.parameters))])
    # Flower's LocalDpMod: std = clip x sqrt(2 ln(1.25 / delta)) / epsilon = 0.0485 here; the
    # clipped update itself (norm <= 0.1 over 693,962 weights) adds about 1e-4 of it.
    assert change.std() == pytest.approx(0.1 * np.sqrt(2 * np.log(1.25 / 1e-5)) / 10, rel=0.01)
    assert res.num_examples > 2000  # local DP keeps FedAvg's weighting


def test_epsilon_grows_with_rounds_as_dp_accounting_says():
    privacy = compose_config(["privacy=central_dp", "privacy.noise_multiplier=1.0"]).privacy
    budget = PrivacyBudget(privacy, num_sampled=10, population=100)
    spent = [budget.spend() for _ in range(5)]
    assert all(a < b for a, b in zip(spent, spent[1:]))
    # The same figure from dp-accounting itself: 5 rounds, 10 of 100 sampled without replacement.
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=NeighboringRelation.REPLACE_ONE)
    event = dp_event.SampledWithoutReplacementDpEvent(100, 10, dp_event.GaussianDpEvent(1.0))
    accountant.compose(event, 5)
    assert spent[-1] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_the_budget_sets_the_last_round_before_the_run_starts():
    # 10 clients, all sampled, z=0.1: epsilon after rounds 1, 2, 3 is about 96, 166, 231.
    privacy = compose_config(["privacy=central_dp", "privacy.noise_multiplier=0.1"]).privacy

    def budget(target_epsilon=200.0, rounds_done=0):
        return PrivacyBudget(dataclasses.replace(privacy, target_epsilon=target_epsilon), 10, 10, rounds_done)

    assert budget().last_round(5) == 2
    assert budget(rounds_done=1).last_round(5) == 2  # a resumed run
    assert budget(rounds_done=2).last_round(5) == 2  # nothing left to run
    assert budget(target_epsilon=None).last_round(5) == budget(target_epsilon=1000).last_round(5) == 5
    # A resumed run counts the rounds before it: the same epsilon as one that never stopped.
    resumed, whole = budget(rounds_done=2), budget()
    assert resumed.spend() == pytest.approx([whole.spend() for _ in range(3)][-1], rel=1e-9)
    with pytest.raises(ConfigError) as err:
        budget(target_epsilon=50).last_round(5)
    assert err.value.key == "privacy.target_epsilon" and "one round already" in str(err.value)


@pytest.mark.parametrize(
    "overrides, key, text",
    [
        (["privacy=secagg", "privacy.dp=server_fixed"], "privacy.dp", "use client_fixed"),
        (["privacy=secagg", "privacy.secagg_reconstruction_threshold=3"],
         "privacy.secagg_reconstruction_threshold", "[2, 3)"),
        (["privacy=secagg", "min_fit_clients=1"], "min_fit_clients", ">= privacy.secagg_reconstruction_threshold"),
        (["privacy.target_epsilon=1"], "privacy.target_epsilon", "needs central DP"),
        (["privacy=central_dp", "privacy.noise_multiplier=0"], "privacy.noise_multiplier", "(0, inf)"),
        (["privacy.dp=gaussian"], "privacy.dp", "none, server_fixed, client_fixed, local"),
        (["privacy=client_dp", "privacy.dp=client_adaptive"], "privacy.dp", "moves its norm away"),
        (["privacy=secagg", "privacy.dp=client_fixed"], "privacy.secagg_max_weight",
         "must be 1 with central DP"),
    ],
)
def test_bad_privacy_settings_name_the_key(overrides, key, text):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert err.value.key == key and text in str(err.value)


def history(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_dp_run_learns_logs_epsilon_and_stops_at_the_budget(tmp_path):
    # 10 clients, all sampled: epsilon after rounds 1, 2, 3 is about 96, 166, 231 at z=0.1.
    # eval_every=3 would skip round 2, but the run's last model is evaluated all the same.
    run_dir = tmp_path / "run"
    result = run_simulation_cli(
        "num_clients=10", "num_rounds=3", "fraction_evaluate=0", "eval_every=3", "privacy=central_dp",
        "privacy.noise_multiplier=0.1", "privacy.target_epsilon=200", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = history(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]  # a third round would pass epsilon 200
    assert 0 < rounds[0]["epsilon"] < rounds[1]["epsilon"] <= 200
    assert "test_accuracy" not in rounds[0]
    assert rounds[-1]["test_accuracy"] > 0.3, rounds  # chance is 0.1
    log = (run_dir / "run_simulation.log").read_text()
    assert "| epsilon " in log and "another round would take epsilon above 200" in log


# 4 clients, each training on 3,000 images (the other 80 % of its quarter held out, unused).
SECAGG = ["num_clients=4", "min_fit_clients=3", "fraction_evaluate=0",
          "dataset.val_fraction=0.8", "privacy=secagg", "privacy.secagg_num_shares=4",
          "privacy.secagg_reconstruction_threshold=3"]


def secagg_and_plain_runs(tmp_path, *overrides):
    """The same federation with and without SecAgg+ (output dirs `plain` and `secagg`)."""
    plain, secure = tmp_path / "plain", tmp_path / "secagg"
    for run_dir, extra in ((plain, ["privacy=none"]), (secure, [])):
        result = run_simulation_cli(*SECAGG, *extra, *overrides, f"output_dir={run_dir}",
                                    f"hydra.run.dir={run_dir / 'logs'}")
        assert result.returncode == 0, result.stderr[-3000:]
    return plain, secure


def test_secagg_aggregate_equals_plain_fedavg_within_the_quantisation_error(tmp_path):
    plain, secure = secagg_and_plain_runs(tmp_path, "num_rounds=1")
    cfg = compose_config(SECAGG).privacy
    total = history(plain)[0]["train_examples"]
    assert history(secure)[0]["train_examples"] == total and history(secure)[0]["status"] == "ok"
    # Each client sends w * weights, w = examples / max_weight, quantised in steps of
    # 2c / Q over [-c, c]: the weighted average is off by at most n * 2c * max_weight / (Q * total).
    bound = 4 * 2 * cfg.secagg_clipping_range * cfg.secagg_max_weight / (cfg.secagg_quantization_range * total)
    weights = [keras.models.load_model(d / "model.keras").get_weights() for d in (plain, secure)]
    worst = max(np.abs(a - b).max() for a, b in zip(*weights))
    assert 0 < worst <= bound + 1e-6, (worst, bound)  # 1e-6: float32 rounding of the weights
    assert history(secure)[0]["test_accuracy"] == pytest.approx(history(plain)[0]["test_accuracy"], abs=0.005)

    # Two more rounds of both (resumed): the accuracies still match.
    secagg_and_plain_runs(tmp_path, "num_rounds=3", "resume=true")
    final = [history(d)[-1] for d in (plain, secure)]
    assert [r["round"] for r in final] == [3, 3] and final[1]["status"] == "ok"
    assert final[0]["test_accuracy"] > history(plain)[0]["test_accuracy"]  # still learning
    assert final[1]["test_accuracy"] == pytest.approx(final[0]["test_accuracy"], abs=0.01)


DROPOUT_RUN = '''
import sys
from flwr.simulation import run_simulation
from fl_app.client_app import build_client_app
from fl_app.config import compose_config
from fl_app.server_app import build_server_app


def drop_out_mid_protocol(message, context, call_next):
    """Partition 0 vanishes after SecAgg+'s key exchange, before sending its masked update."""
    configs = message.content.config_records.get("secaggplus_configs", {})
    if context.node_config["partition-id"] == 0 and configs.get("stage") == "collect_masked_vectors":
        raise RuntimeError("partition 0 dropped out")
    return call_next(message, context)


cfg = compose_config(sys.argv[1:])
run_simulation(server_app=build_server_app(cfg),
               client_app=build_client_app(cfg, mods=(drop_out_mid_protocol,)),
               num_supernodes=cfg.num_clients,
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
'''


def test_secagg_round_completes_when_a_client_drops_out_mid_protocol(tmp_path):
    script, out = tmp_path / "dropout_run.py", tmp_path / "run"
    script.write_text(DROPOUT_RUN)
    result = subprocess.run([sys.executable, str(script), *SECAGG, "num_rounds=1", f"output_dir={out}"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = history(out)
    # 4 shares, threshold 3: one dropout is tolerated, the other three are aggregated.
    assert (record["clients_succeeded"], record["status"]) == (3, "ok"), record
    assert record["test_accuracy"] > 0.8


def test_secagg_with_client_side_dp_learns_and_spends_epsilon(tmp_path):
    run_dir = tmp_path / "run"
    result = run_simulation_cli(*SECAGG, "num_rounds=1", "privacy=secagg_dp", "privacy.noise_multiplier=0.01",
                                f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = history(run_dir)
    assert record["status"] == "ok" and record["epsilon"] > 0
    assert record["test_accuracy"] > 0.3, record
