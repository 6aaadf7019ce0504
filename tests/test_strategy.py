"""ValidatedFedAvg on real Flower objects: weighted averaging and rejection of bad updates."""

import numpy as np
import pytest
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fl_app.strategy import ValidatedFedAvg, update_problem, weighted_average

SHAPES = [(3, 2), (2,)]


def arrays(value: float) -> list[np.ndarray]:
    return [np.full(shape, value, dtype=np.float32) for shape in SHAPES]


def start_round(num_clients: int, min_fit_clients: int = 2) -> tuple[ValidatedFedAvg, list]:
    """A strategy that has configured round 1 for `num_clients` registered clients."""
    manager = SimpleClientManager()
    proxies = [GridClientProxy(node_id=i + 1, grid=None, run_id=0) for i in range(num_clients)]
    for proxy in proxies:
        manager.register(proxy)
    strategy = ValidatedFedAvg(min_fit_clients=min_fit_clients, min_available_clients=num_clients)
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(arrays(0.0)), manager)
    assert len(instructions) == num_clients
    return strategy, proxies


def fit_result(proxy, weights, num_examples, **metrics):
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), num_examples, metrics)
    return proxy, res


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
    assert reason in update_problem(bad, 1000, expected)
    assert "rejected update" in caplog.text


def test_round_with_too_few_valid_updates_keeps_the_model_and_is_marked_failed():
    strategy, proxies = start_round(3, min_fit_clients=2)
    nan = [np.full(s, np.nan, np.float32) for s in SHAPES]
    results = [fit_result(proxies[0], arrays(1.0), 50), fit_result(proxies[1], nan, 50)]
    parameters, metrics = strategy.aggregate_fit(1, results, [RuntimeError("client crashed")])
    assert parameters is None and metrics == {}
    assert strategy.rounds[1]["status"] == "failed"
    assert strategy.rounds[1]["clients_failed"] == 2


def test_weighted_average_skips_identity_metrics():
    assert weighted_average([(1, {"acc": 1.0, "partition_id": 4}), (3, {"acc": 0.0, "partition_id": 9})]) == {
        "acc": 0.25
    }
