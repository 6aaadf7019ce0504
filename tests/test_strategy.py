"""Flower's strategies wrapped in ValidatedStrategy, on real Flower objects: aggregation
as each method defines it, and rejection of bad updates by every one of them."""

import numpy as np
import pytest
from conftest import fit_result
from flwr.app import Error
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.server import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fl_app.outputs import Checkpoint, RunOutputs
from fl_app.config import CONF_DIR, compose_config
from fl_app.config_schema import STRATEGIES, own_settings
from fl_app.strategy import (
    ValidatedStrategy,
    build_strategy,
    failure_reason,
    update_problem,
    weighted_average,
)

SHAPES = [(3, 2), (2,)]


def arrays(value: float) -> list[np.ndarray]:
    return [np.full(shape, value, dtype=np.float32) for shape in SHAPES]


def start_round(
    num_clients: int, min_fit_clients: int = 2, name: str = "fedavg", secure_aggregation: bool = False,
    frozen_digest: str | None = None, **settings
) -> tuple[ValidatedStrategy, list]:
    """A strategy that has configured round 1 for `num_clients` registered clients."""
    manager = SimpleClientManager()
    proxies = [GridClientProxy(node_id=i + 1, grid=None, run_id=0) for i in range(num_clients)]
    for proxy in proxies:
        manager.register(proxy)
    strategy = build_strategy(name, settings, arrays(0.0), min_fit_clients=min_fit_clients,
                              min_available_clients=num_clients, secure_aggregation=secure_aggregation,
                              frozen_digest=frozen_digest)
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(arrays(0.0)), manager)
    assert len(instructions) == num_clients
    return strategy, proxies


def test_aggregate_equals_numpy_weighted_mean():
    strategy, proxies = start_round(3)
    rng = np.random.default_rng(0)
    updates = [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in proxies]
    counts = [10, 30, 60]
    results = [
        fit_result(p, u, n, train_loss=float(i), partition_id=i)
        for i, (p, u, n) in enumerate(zip(proxies, updates, counts))
    ]
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    got = parameters_to_ndarrays(parameters)
    for layer, array in enumerate(got):
        expected = np.average([u[layer] for u in updates], axis=0, weights=counts)
        np.testing.assert_allclose(array, expected, rtol=1e-6)
    assert metrics == {"train_loss": pytest.approx((0 * 10 + 1 * 30 + 2 * 60) / 100)}
    assert strategy.rounds[1]["clients_succeeded"] == 3 and strategy.rounds[1]["status"] == "ok"
    assert strategy.rounds[1]["train_examples"] == 100


@pytest.mark.parametrize(
    "bad, reason",
    [
        ([np.full((3, 2), np.nan, np.float32), np.zeros(2, np.float32)], "NaN or Inf"),
        ([np.full((3, 2), np.inf, np.float32), np.zeros(2, np.float32)], "NaN or Inf"),
        ([np.zeros((2, 3), np.float32), np.zeros(2, np.float32)], "expected float32[3, 2]"),
        ([np.zeros((3, 2), np.float32)], "1 arrays, expected 2"),
        ([np.zeros((3, 2), np.float64), np.zeros(2, np.float32)], "float64"),
    ],
)
def test_bad_update_is_dropped_and_never_averaged_in(bad, reason, caplog):
    strategy, proxies = start_round(3)
    results = [fit_result(proxies[0], arrays(1.0), 50), fit_result(proxies[1], arrays(3.0), 50),
               fit_result(proxies[2], bad, 1000)]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    assert all(np.allclose(a, 2.0) for a in parameters_to_ndarrays(parameters))
    assert strategy.rounds[1]["clients_succeeded"] == 2 and strategy.rounds[1]["clients_failed"] == 1
    expected = [((3, 2), np.dtype(np.float32)), ((2,), np.dtype(np.float32))]
    assert reason in update_problem(bad, expected)
    assert "rejected update" in caplog.text


def test_round_with_too_few_valid_updates_keeps_the_model_and_is_marked_failed():
    strategy, proxies = start_round(3, min_fit_clients=2)
    nan = [np.full(s, np.nan, np.float32) for s in SHAPES]
    results = [fit_result(proxies[0], arrays(1.0), 50), fit_result(proxies[1], nan, 50)]
    parameters, metrics = strategy.aggregate_fit(1, results, [RuntimeError("client crashed")])
    assert parameters is None and metrics == {}
    assert strategy.rounds[1]["status"] == "failed"
    assert strategy.rounds[1]["clients_failed"] == 2


@pytest.mark.parametrize("value", [2.0, np.nan])
def test_secagg_sum_shared_by_all_results_is_cast_to_the_model_dtypes_and_checked(value, caplog):
    # SecAgg+ hands every client's result the same unmasked aggregate, in float64.
    strategy, proxies = start_round(3, secure_aggregation=True)
    shared = ndarrays_to_parameters([a.astype(np.float64) for a in arrays(value)])
    results = [(p, FitRes(Status(Code.OK, ""), shared, 100, {"partition_id": i})) for i, p in enumerate(proxies)]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    if np.isnan(value):  # a poisoned sum: no client's share of it is averaged in
        assert parameters is None and strategy.rounds[1]["clients_failed"] == 3
        assert caplog.text.count("holds NaN or Inf") == 3
    else:
        got = parameters_to_ndarrays(parameters)
        assert all(a.dtype == np.float32 and np.all(a == 2.0) for a in got)
        assert strategy.rounds[1]["clients_succeeded"] == 3


def test_failed_and_silent_clients_are_counted_and_logged_with_their_reason(caplog):
    strategy, proxies = start_round(4, min_fit_clients=1)
    # The reason as Flower 1.42 writes a ClientApp's exception.
    crashed = Exception(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                              "<class 'fl_app.client_app.PartyFailure'>:<'lab_c: no images in class folders'>"))
    refused = (proxies[1], FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "no fit here"), Parameters([], ""), 0, {}))
    # proxies[2] never replies (its round_timeout expired): neither a result nor a failure.
    parameters, _ = strategy.aggregate_fit(1, [fit_result(proxies[3], arrays(1.0), 10)], [crashed, refused])
    assert parameters is not None
    assert strategy.rounds[1]["clients_succeeded"] == 1 and strategy.rounds[1]["clients_failed"] == 3
    assert "failed to train: PartyFailure: lab_c: no images in class folders" in caplog.text
    assert f"client {proxies[1].cid}: no fit here" in caplog.text
    assert "1 client(s) did not reply within round_timeout" in caplog.text
    assert strategy.why_failed == {}  # one valid update was enough


def test_a_failed_round_says_why():
    strategy, proxies = start_round(3, min_fit_clients=2)
    crashed = Exception(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "out of memory"))
    parameters, _ = strategy.aggregate_fit(1, [fit_result(proxies[0], arrays(1.0), 10),
                                               fit_result(proxies[1], arrays(np.nan), 10)], [crashed])
    assert parameters is None
    assert strategy.why_failed[1] == (f"1 valid update(s), min_fit_clients=2; out of memory; "
                                      f"{proxies[1].cid}'s update rejected: array 0 holds NaN or Inf")


def test_weighted_average_skips_identity_metrics():
    assert weighted_average([(1, {"acc": 1.0, "partition_id": 4}), (3, {"acc": 0.0, "partition_id": 9})]) == {
        "acc": 0.25
    }


# Each strategy with the settings of its conf/strategy/<name>.yaml.
SETTINGS = {name: own_settings(compose_config([f"strategy={name}"]).strategy) for name in STRATEGIES}


def test_every_strategy_has_its_conf_file_and_flower_class():
    assert set(STRATEGIES) == {path.stem for path in (CONF_DIR / "strategy").glob("*.yaml")}
    assert SETTINGS["fedavgm"] == {"server_learning_rate": 0.1, "server_momentum": 0.9}
    for name in STRATEGIES:
        assert build_strategy(name, SETTINGS[name], arrays(0.0)).optimizer.__class__.__name__ == STRATEGIES[name].flower_class


def five_updates(rng):
    return [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(5)]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_strategy_drops_a_nan_update_and_aggregates_the_rest(name, caplog):
    strategy, proxies = start_round(6, name=name, **SETTINGS[name])
    updates = five_updates(np.random.default_rng(1))
    results = [fit_result(p, u, 100, partition_id=i) for i, (p, u) in enumerate(zip(proxies, updates))]
    nan = [np.full(s, np.nan, np.float32) for s in SHAPES]
    parameters, _ = strategy.aggregate_fit(1, [*results, fit_result(proxies[5], nan, 100)], [])
    got = parameters_to_ndarrays(parameters)
    assert [a.shape for a in got] == SHAPES and all(np.all(np.isfinite(a)) for a in got)
    assert strategy.rounds[1]["clients_succeeded"] == 5 and "rejected update" in caplog.text


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fedmedian", lambda ups: np.median(ups, axis=0)),
        # beta=0.2 of 5 updates: the largest and smallest value of each coordinate go.
        ("fedtrimmedavg", lambda ups: np.sort(ups, axis=0)[1:-1].mean(axis=0)),
        ("fedprox", lambda ups: np.mean(ups, axis=0)),  # the server side of FedProx is FedAvg
    ],
)
def test_robust_aggregates_are_coordinate_wise(name, expected):
    strategy, proxies = start_round(5, name=name, **SETTINGS[name])
    updates = five_updates(np.random.default_rng(2))
    results = [fit_result(p, u, 100, partition_id=i) for i, (p, u) in enumerate(zip(proxies, updates))]
    got = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [])[0])
    for layer, array in enumerate(got):
        np.testing.assert_allclose(array, expected(np.stack([u[layer] for u in updates])), rtol=1e-5)


def test_krum_keeps_an_update_close_to_the_others_not_an_outlier():
    strategy, proxies = start_round(5, name="krum", num_malicious_clients=1, num_clients_to_keep=0)
    updates = [arrays(v) for v in (1.0, 1.1, 0.9, 1.05, 50.0)]  # the last one attacks
    results = [fit_result(p, u, 100, partition_id=i) for i, (p, u) in enumerate(zip(proxies, updates))]
    got = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [])[0])
    assert got[0].max() < 2.0


def test_server_momentum_accumulates_across_rounds():
    # FedAvgM from 0 towards updates at 1.0: lr 1, momentum 0.5 -> 1.0, then 1.0 + 1.5 = 2.5.
    strategy, proxies = start_round(2, name="fedavgm", server_learning_rate=1.0, server_momentum=0.5)
    results = [fit_result(p, arrays(1.0), 10, partition_id=i) for i, p in enumerate(proxies)]
    first = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [])[0])
    assert np.allclose(first[0], 1.0)
    results = [fit_result(p, arrays(2.0), 10, partition_id=i) for i, p in enumerate(proxies)]
    strategy.rounds[2] = {"round": 2, "clients_sampled": 2}
    second = parameters_to_ndarrays(strategy.aggregate_fit(2, results, [])[0])
    assert np.allclose(second[0], 2.5)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimisers_step_by_about_eta_towards_the_average(name):
    # Adam-type steps have size ~eta per coordinate whatever the update's scale.
    strategy, proxies = start_round(2, name=name, **SETTINGS[name])
    results = [fit_result(p, arrays(5.0), 10, partition_id=i) for i, p in enumerate(proxies)]
    got = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [])[0])
    assert np.all((got[0] > 0) & (got[0] < 0.1)), got[0]
    # The global model keeps its dtype (FedAdam computes in float64), so the clients'
    # float32 updates of the next round are accepted.
    assert [a.dtype for a in got] == [np.float32, np.float32]


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_resumed_server_optimiser_continues_exactly_as_without_the_crash(name, tmp_path):
    settings = SETTINGS[name]
    # Two clients' updates per round, all around the same target so the state matters.
    targets = {1: (1.0, 2.0), 2: (2.0, 3.0), 3: (1.5, 2.5)}

    def aggregate(strategy, proxies, server_round):
        strategy.rounds[server_round] = {"round": server_round, "clients_sampled": 2}
        results = [fit_result(p, arrays(t), 10, partition_id=i)
                   for i, (p, t) in enumerate(zip(proxies, targets[server_round]))]
        return parameters_to_ndarrays(strategy.aggregate_fit(server_round, results, [])[0])

    strategy, proxies = start_round(2, name=name, **settings)
    uninterrupted = [aggregate(strategy, proxies, r) for r in (1, 2, 3)]

    crashed, proxies = start_round(2, name=name, **settings)
    outputs = RunOutputs(tmp_path)
    outputs.save_checkpoint(Checkpoint(1, aggregate(crashed, proxies, 1), [], crashed.optimizer_state()))
    saved = outputs.load_checkpoint()
    assert set(saved.optimizer_state) == ({"momentum_vector"} if name == "fedavgm" else {"m_t", "v_t"})
    resumed = build_strategy(name, settings, saved.weights, min_fit_clients=2, min_available_clients=2)
    resumed.restore_optimizer_state(saved.optimizer_state)
    resumed.configure_fit(2, ndarrays_to_parameters(saved.weights), crashed_clients(proxies))
    for server_round in (2, 3):
        for got, want in zip(aggregate(resumed, proxies, server_round), uninterrupted[server_round - 1]):
            np.testing.assert_array_equal(got, want)


def crashed_clients(proxies) -> SimpleClientManager:
    """The clients, connected again to the restarted server."""
    manager = SimpleClientManager()
    for proxy in proxies:
        manager.register(proxy)
    return manager


def test_seeded_sampling_draws_the_same_clients_whatever_order_they_connected_in():
    proxies = [GridClientProxy(node_id=i + 1, grid=None, run_id=0) for i in range(50)]

    def drawn(seed, server_round, order, **settings):
        manager = SimpleClientManager()
        for k in order:
            manager.register(proxies[k])
        strategy = build_strategy("fedavg", {}, arrays(0.0), fraction_fit=0.2, fraction_evaluate=0.1,
                                  min_available_clients=50, sampling_seed=seed, **settings)
        parameters = ndarrays_to_parameters(arrays(0.0))
        fit = [proxy.cid for proxy, _ in strategy.configure_fit(server_round, parameters, manager)]
        evaluate = [proxy.cid for proxy, _ in strategy.configure_evaluate(server_round, parameters, manager)]
        return fit, evaluate

    forward, backward = list(range(50)), list(range(50))[::-1]
    fit, evaluate = drawn(7, 3, forward)
    assert len(fit) == 10 and len(set(fit)) == 10 and len(evaluate) == 5
    assert drawn(7, 3, backward) == (fit, evaluate)  # the round of a resumed run, say
    assert drawn(7, 4, forward)[0] != fit and drawn(8, 3, forward)[0] != fit
    # Flower's own draw (no seed) depends on its global generator; one of these differs.
    assert len({tuple(drawn(None, 3, forward)[0]) for _ in range(3)}) > 1


def test_heads_on_the_same_frozen_backbone_are_averaged_and_one_on_another_is_refused(caplog):
    # model.train=head: the arrays are a head's, each update says which backbone it trained on.
    strategy, proxies = start_round(3, frozen_digest="abc")
    results = [fit_result(proxies[0], arrays(1.0), 10, frozen_digest="abc", client="site_a"),
               fit_result(proxies[1], arrays(4.0), 30, frozen_digest="abc", client="site_b"),
               fit_result(proxies[2], arrays(100.0), 20, frozen_digest="other", client="site_c")]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    assert all(np.allclose(a, (1.0 * 10 + 4.0 * 30) / 40) for a in parameters_to_ndarrays(parameters))
    assert "rejected update of client site_c: its frozen backbone differs from the server's" in caplog.text


def test_a_simulated_clients_failure_is_shown_as_the_exception_its_clientapp_raised():
    # Flower's simulation sends the Ray traceback of the ClientApp's exception (shortened here).
    reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=1)\n"
              "  File \"client_app.py\", line 1, in mod\n"
              "RuntimeError: disk full\n\nDuring handling of the above exception, another exception occurred:\n"
              "fl_app.client_app.PartyFailure: 1: disk full\n\n"
              "The above exception was the direct cause of the following exception:\n"
              "flwr.clientapp.client_app.ClientAppException: \n"
              "Exception ClientAppException occurred. Message: 1: disk full'>")
    assert failure_reason(Exception(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason))) == (
        "PartyFailure: 1: disk full")
