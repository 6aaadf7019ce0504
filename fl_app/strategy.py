"""Flower's strategies, each wrapped to check every client update and record each round.

Flower's strategies aggregate whatever arrives; one NaN or mis-shaped update would
poison the global model. `ValidatedStrategy` wraps any of them (as Flower's own DP
wrappers do): each update is checked against the global model it was trained from,
bad ones are dropped and logged, a round left with fewer than `min_fit_clients` valid
updates keeps the global model unchanged, and every round is recorded for the history.
Given a seed, it also makes the strategy's draw of clients reproducible (`SeededSampling`).
"""

import random
import re
from collections.abc import Callable
from logging import INFO, WARNING

import flwr.server.strategy
import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import Strategy

from fl_app.config_schema import STRATEGIES

# Metrics a client reports that identify or count it rather than measure it: never averaged.
ID_METRICS = ("partition_id", "num_examples", "client", "train_examples", "confusion_matrix", "frozen_digest")


def weighted_average(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Average each client metric weighted by the client's number of examples."""
    total = sum(num_examples for num_examples, _ in metrics)
    if total == 0:
        return {}
    keys = {key for _, client in metrics for key in client if key not in ID_METRICS}
    return {
        key: sum(n * float(client[key]) for n, client in metrics if key in client) / total
        for key in sorted(keys)
    }


def update_problem(arrays: NDArrays, expected: list[tuple[tuple[int, ...], np.dtype]]) -> str | None:
    """Why a client update's arrays must not be averaged in, or None when they are sound."""
    if len(arrays) != len(expected):
        return f"{len(arrays)} arrays, expected {len(expected)}"
    for index, (array, (shape, dtype)) in enumerate(zip(arrays, expected)):
        if array.shape != shape or array.dtype != dtype:
            return f"array {index} is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
        if not np.all(np.isfinite(array)):
            return f"array {index} holds NaN or Inf"
    return None


def failure_reason(failure: tuple[ClientProxy, FitRes | EvaluateRes] | BaseException) -> str:
    """What a failed client reported: its error reply, e.g. the ClientApp's exception, which
    Flower sends as "<class 'module.Name'>:<'message'>" (in simulation the message is a Ray
    traceback), shown as "Name: message" of the exception the ClientApp raised."""
    if isinstance(failure, BaseException):
        error = failure.args[0] if failure.args else failure  # Flower wraps the reply's Error
        reason = str(getattr(error, "reason", None) or error)
        raised = re.fullmatch(r"<class '(?:[\w.]+\.)?([^'.]+)'>:<'(.*)'>", reason, re.DOTALL)
        if not raised:
            return reason
        # The exceptions in a traceback, but Flower's wrapper of the ClientApp's
        raised_in_it = [(name, message) for name, message in re.findall(
            r"^(?:[\w.]+\.)?(\w+): (.+)$", raised[2], re.MULTILINE) if name != "ClientAppException"]
        name, message = raised_in_it[-1] if "\n" in raised[2] and raised_in_it else raised.groups()
        return f"{name}: {message}"
    proxy, res = failure
    return f"client {proxy.cid}: {res.status.message}"


# Server-optimiser state that Flower's strategies keep in attributes and never save (FedAdam,
# FedYogi, FedAdagrad: m_t, v_t; FedAvgM: momentum_vector): checkpointed by fl_app so that a
# resumed run continues the same optimisation (FedAvgM with momentum cannot resume without it).
# A reliance on Flower's internals: fl_app/library_patches.py, RELIANCES.
OPTIMIZER_STATE = ("m_t", "v_t", "momentum_vector")


def build_strategy(
    name: str,
    settings: dict[str, Scalar],
    initial_weights: NDArrays,
    *,
    wrap: Callable[[Strategy], Strategy] = lambda strategy: strategy,
    secure_aggregation: bool = False,
    sampling_seed: int | None = None,
    frozen_digest: str | None = None,
    **common,
) -> "ValidatedStrategy":
    """Flower's strategy `name`, started from `initial_weights`, wrapped in validation.

    `common` are the keyword arguments all of them share (fractions, minimums,
    evaluate_fn, on_fit_config_fn, ...). Server-side optimisers (FedAvgM, FedAdam, ...)
    take their step from `initial_weights`, so a resumed run passes its checkpoint.
    `wrap` puts another Flower wrapper (e.g. differential privacy) between the two.
    `sampling_seed` makes its draws of clients reproducible (`SeededSampling`).
    `frozen_digest`: a frozen backbone's fingerprint, which every update must carry.
    """
    common.setdefault("fit_metrics_aggregation_fn", weighted_average)
    common.setdefault("evaluate_metrics_aggregation_fn", weighted_average)
    # conf/strategy/<name>.yaml -> Flower's class; the yaml's settings are its keyword arguments.
    flower_class = getattr(flwr.server.strategy, STRATEGIES[name].flower_class)
    strategy = flower_class(
        initial_parameters=ndarrays_to_parameters(initial_weights), **settings, **common
    )
    return ValidatedStrategy(wrap(strategy), strategy.min_fit_clients, secure_aggregation,
                             optimizer=strategy, sampling_seed=sampling_seed, frozen_digest=frozen_digest)


class SeededSampling:
    """The run's client manager, drawing clients with a generator of its own.

    Flower's `SimpleClientManager.sample` draws with Python's unseeded global generator
    from its clients in the order they connected, so the same seed sampled different
    clients in every run. This draws from the clients in order of id (a simulation's node
    ids are seeded: fl_app/library_patches.py) with `rng`, and otherwise waits, filters and
    fails as Flower's does. `population`: how many clients the last draw was made from,
    which differential privacy's accounting needs.
    """

    def __init__(self, manager: ClientManager, rng: random.Random) -> None:
        self.manager = manager
        self.rng = rng
        self.population = 0

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        self.manager.wait_for(num_clients if min_num_clients is None else min_num_clients)
        clients = self.manager.all()
        available = sorted(cid for cid, proxy in clients.items() if criterion is None or criterion.select(proxy))
        self.population = len(available)
        if num_clients > len(available):
            log(INFO, "Sampling failed: %s clients available, %s requested", len(available), num_clients)
            return []
        return [clients[cid] for cid in self.rng.sample(available, num_clients)]

    def __getattr__(self, name: str):
        return getattr(self.manager, name)


class ValidatedStrategy(Strategy):
    """A Flower strategy plus update validation and a per-round record (`rounds`).

    secure_aggregation: the results are SecAgg+'s (every client carries the same unmasked
    sum, in float64), so only that sum can be checked.
    sampling_seed: each round's draws of clients (to train, to evaluate) are seeded by it,
    the round and the phase, so a resumed run draws what the uninterrupted one did (None:
    draws from the operating system's randomness, which no one can recompute).
    frozen_digest: with a frozen backbone, only heads travel, and a head trained on another
    backbone's features must not be averaged in: an update whose `frozen_digest` metric
    differs is rejected (not checkable under SecAgg+, which hides each client's metrics).
    """

    def __init__(self, strategy: Strategy, min_fit_clients: int, secure_aggregation: bool = False,
                 optimizer: Strategy | None = None, sampling_seed: int | None = None,
                 frozen_digest: str | None = None) -> None:
        super().__init__()
        self.strategy = strategy
        self.optimizer = optimizer or strategy  # the Flower strategy inside any wrapper
        self.min_fit_clients = min_fit_clients
        self.secure_aggregation = secure_aggregation
        self.sampling_seed = sampling_seed
        self.frozen_digest = frozen_digest
        # round -> what happened in it; the server loop adds timing and persists it.
        self.rounds: dict[int, dict[str, Scalar]] = {}
        # round -> each evaluating client's figures, and their summed confusion counts
        self.parties: dict[int, list[dict[str, Scalar]]] = {}
        self.confusion: dict[int, np.ndarray] = {}
        self.why_failed: dict[int, str] = {}  # round -> why it aggregated nothing
        self._expected: list[tuple[tuple[int, ...], np.dtype]] = []

    def __repr__(self) -> str:
        return f"ValidatedStrategy({self.strategy!r})"

    def optimizer_state(self) -> dict[str, list[np.ndarray]]:
        """The server optimiser's state (OPTIMIZER_STATE), for the checkpoint."""
        return {name: list(getattr(self.optimizer, name)) for name in OPTIMIZER_STATE
                if getattr(self.optimizer, name, None) is not None}

    def restore_optimizer_state(self, state: dict[str, list[np.ndarray]]) -> None:
        for name, arrays in state.items():
            setattr(self.optimizer, name, list(arrays))

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def _sampling(self, client_manager: ClientManager, server_round: int, phase: str) -> SeededSampling:
        if self.sampling_seed is None:
            return SeededSampling(client_manager, random.SystemRandom())
        return SeededSampling(client_manager, random.Random(f"{self.sampling_seed}/{server_round}/{phase}"))

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._expected = [(a.shape, a.dtype) for a in parameters_to_ndarrays(parameters)]
        sampling = self._sampling(client_manager, server_round, "fit")
        instructions = self.strategy.configure_fit(server_round, parameters, sampling)
        sampled = len(instructions)
        # Failed until aggregated (SecAgg+ may halt a round without aggregating).
        self.rounds[server_round] = {"round": server_round, "clients_available": sampling.population,
                                     "clients_sampled": sampled, "clients_succeeded": 0,
                                     "clients_failed": sampled, "status": "failed"}
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        problems = [failure_reason(failure) for failure in failures]
        for problem in problems:
            log(WARNING, "Round %s: a client failed to train: %s", server_round, problem)
        if self.secure_aggregation and results:
            # Every result carries the same unmasked sum: decoded, cast and checked once.
            shared = self._in_model_dtypes(parameters_to_ndarrays(results[0][1].parameters))
            problem_of_sum = update_problem(shared, self._expected)
            encoded = ndarrays_to_parameters(shared)
            for _, res in results:
                res.parameters = encoded
        valid, rejected = [], []
        for proxy, res in results:
            if self.secure_aggregation:
                problem = problem_of_sum
            else:
                problem = update_problem(parameters_to_ndarrays(res.parameters), self._expected)
            if res.num_examples < 1:
                problem = f"num_examples is {res.num_examples}"
            elif self.frozen_digest and not self.secure_aggregation and (
                    res.metrics.get("frozen_digest") != self.frozen_digest):
                problem = ("its frozen backbone differs from the server's (model.weights and init_from must "
                           "be the same files at every party)")
            if problem:
                log(WARNING, "Round %s: rejected update of client %s: %s", server_round,
                    res.metrics.get("client", proxy.cid), problem)
                problems.append(f"{res.metrics.get('client', proxy.cid)}'s update rejected: {problem}")
                rejected.append((proxy, res))
            else:
                valid.append((proxy, res))
        record = self.rounds[server_round]
        # max: SecAgg+ may list one failed client twice.
        silent = max(0, record["clients_sampled"] - len(results) - len(failures))
        if silent:
            log(WARNING, "Round %s: %s client(s) did not reply within round_timeout", server_round, silent)
            problems.append(f"{silent} client(s) did not reply within round_timeout")
        record["clients_succeeded"] = len(valid)
        # Under central DP clients count once (num_examples=1) and report their real count.
        record["train_examples"] = sum(int(res.metrics.get("num_examples", res.num_examples))
                                       for _, res in valid)
        record["clients_failed"] = record["clients_sampled"] - len(valid)
        if len(valid) < self.min_fit_clients:
            log(
                WARNING,
                "Round %s failed: %s valid updates, min_fit_clients=%s; global model unchanged",
                server_round,
                len(valid),
                self.min_fit_clients,
            )
            self.why_failed[server_round] = "; ".join(
                [f"{len(valid)} valid update(s), min_fit_clients={self.min_fit_clients}", *problems])
            return None, {}
        # A fixed order makes the floating-point sum, and so the run, reproducible.
        valid.sort(key=lambda r: (r[1].metrics.get("partition_id", -1), r[0].cid))
        parameters, metrics = self.strategy.aggregate_fit(server_round, valid, [*failures, *rejected])
        if parameters is None:
            log(WARNING, "Round %s: %r aggregated nothing; global model unchanged", server_round,
                self.strategy)
            self.why_failed[server_round] = f"{self.strategy!r} aggregated nothing"
            return None, {}
        record["status"] = "ok"
        record.update(metrics)
        arrays = parameters_to_ndarrays(parameters)
        cast = self._in_model_dtypes(arrays)
        return (parameters if cast is arrays else ndarrays_to_parameters(cast)), metrics

    def _in_model_dtypes(self, arrays: NDArrays) -> NDArrays:
        """Arrays cast to the global model's dtypes (shapes are left for validation);
        `arrays` itself when nothing needs a cast.

        SecAgg+ unmasks its sum in float64, and Flower's FedAdam scales by a float64 factor;
        left so, clients would return float32 updates, and every one would be rejected.
        """
        if len(arrays) != len(self._expected) or all(
                a.dtype == dtype for a, (_, dtype) in zip(arrays, self._expected)):
            return arrays
        return [a.astype(dtype) for a, (_, dtype) in zip(arrays, self._expected)]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters,
                                                self._sampling(client_manager, server_round, "evaluate"))

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        result = self.strategy.evaluate(server_round, parameters)
        if result is not None and server_round in self.rounds:
            loss, metrics = result
            self.rounds[server_round].update(
                {"test_loss": loss, **{f"test_{k}": v for k, v in metrics.items()}}
            )
        return result

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        for failure in failures:
            log(WARNING, "Round %s: a client failed to evaluate: %s", server_round, failure_reason(failure))
        self._record_parties(server_round, results)
        loss, metrics = self.strategy.aggregate_evaluate(server_round, results, failures)
        if loss is not None:
            self.rounds[server_round].update(
                {"eval_loss": loss, **{f"eval_{k}": v for k, v in metrics.items()}}
            )
        return loss, metrics

    def _record_parties(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]]) -> None:
        """Each client's evaluation (`parties`) and the sum of their confusion counts
        (`confusion`), which gives per-class figures that no single client's data shows."""
        self.parties[server_round] = sorted((
            {"client": res.metrics.get("client", proxy.cid), "train_examples": res.metrics.get("train_examples", ""),
             "eval_examples": res.num_examples, "eval_loss": res.loss, "eval_accuracy": res.metrics.get("accuracy", "")}
            for proxy, res in results), key=lambda row: str(row["client"]))
        matrices = []
        for proxy, res in results:
            counts = np.frombuffer(res.metrics.get("confusion_matrix", b""), "<i8")
            size = int(round(np.sqrt(counts.size)))
            if counts.size == 0 or size * size != counts.size or counts.min() < 0:
                log(WARNING, "Round %s: client %s sent no valid confusion counts; per-class figures "
                    "leave it out", server_round, proxy.cid)
                continue
            matrices.append(counts.reshape(size, size))
        if matrices and len({m.shape for m in matrices}) == 1:
            self.confusion[server_round] = np.sum(matrices, axis=0)
