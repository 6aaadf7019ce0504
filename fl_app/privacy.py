"""The server's side of privacy: central differential privacy (DP-FedAvg), Flower's SecAgg+
workflow, and the privacy budget each round spent, from Google's dp-accounting.

The clients' side (clipping, local noise, SecAgg+ masking) are Flower's client mods, chosen
in `client_app.py`.
"""

import bisect
import copy
from logging import INFO, WARNING

import numpy as np
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.rdp import RdpAccountant
from flwr.common import FitIns, FitRes, Parameters, Scalar, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow

from fl_app.config_schema import CENTRAL_DP, ConfigError, PrivacyConfig

# The fit-config key Flower's `fixedclipping_mod` reads its clipping norm from.
CLIPPING_NORM_KEY = "clipping_norm"


class CentralDp(Strategy):
    """`strategy` with client-level central DP: DP-FedAvg's fixed-denominator estimator.

    Each round the global model moves by (sum of the updates, each clipped to
    `clipping_norm`, + Gaussian noise of std noise_multiplier x clipping_norm) / the number
    of clients *sampled*. A sampled client that fails, times out or is rejected adds
    nothing to the sum, and one client changes the sum by at most 2 x clipping_norm
    whatever the others do, so the noise covers every round as it happened; dividing by the
    number that replied instead would make the model depend on who failed, which may depend
    on a client's data (docs/privacy.md). The noised average then goes through `strategy`'s
    own aggregation, as every client's result, so a server optimiser (FedAdam, FedAvgM, ...)
    steps from it: post-processing, which costs no privacy.

    Written here because Flower 1.42's DP wrappers calibrate the noise to a client count fixed
    when they are built, and void any round in which one client failed.
    `clients_clip`: the clients clip too (Flower's `fixedclipping_mod`, before SecAgg+
    masks their updates); the server clips every result it gets in any case, which leaves an
    honest client's update (or SecAgg+'s average of clipped updates) unchanged.
    """

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float,
                 clients_clip: bool) -> None:
        super().__init__()
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.clients_clip = clients_clip
        self.rng = np.random.default_rng()  # never seeded: a known seed would undo the noise
        self._global: list[np.ndarray] = []
        self._sampled = 0

    def __repr__(self) -> str:
        return f"CentralDp({self.strategy!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_to_ndarrays(parameters)
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        self._sampled = len(instructions)
        if self.clients_clip:
            for _, fit_ins in instructions:
                fit_ins.config[CLIPPING_NORM_KEY] = self.clipping_norm
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        total = [np.zeros(w.shape, np.float64) for w in self._global]
        for _, res in results:
            update = [p.astype(np.float64) - w for p, w in zip(parameters_to_ndarrays(res.parameters), self._global)]
            norm = np.sqrt(sum(np.sum(u * u) for u in update))
            scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            for t, u in zip(total, update):
                t += scale * u
        noise_std = self.noise_multiplier * self.clipping_norm
        noised = ndarrays_to_parameters([
            (w + (t + self.rng.normal(0.0, noise_std, t.shape)) / self._sampled).astype(w.dtype)
            for w, t in zip(self._global, total)
        ])
        for _, res in results:
            res.parameters = noised
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        return parameters, {**metrics, "dp_clients_aggregated": len(results),
                            "dp_noise_std": noise_std / self._sampled}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.strategy.evaluate(server_round, parameters)


def with_central_dp(strategy: Strategy, privacy: PrivacyConfig) -> Strategy:
    """`strategy` under the central DP that `privacy.dp` names, or as it is."""
    if privacy.dp not in CENTRAL_DP:
        return strategy
    return CentralDp(strategy, privacy.noise_multiplier, privacy.clipping_norm,
                     clients_clip=privacy.dp == "client_fixed")


def fit_workflow(privacy: PrivacyConfig):
    """The round's training step: Flower's SecAgg+ when `privacy.secagg`, else its default."""
    if not privacy.secagg:
        return default_fit_workflow
    return SecAggPlusWorkflow(
        num_shares=privacy.secagg_num_shares,
        reconstruction_threshold=privacy.secagg_reconstruction_threshold,
        clipping_range=float(privacy.secagg_clipping_range),  # Flower's mod needs a float
        quantization_range=privacy.secagg_quantization_range,
        max_weight=privacy.secagg_max_weight,  # 1 under central DP (config_schema checks)
        timeout=privacy.secagg_timeout,
    )


class PrivacyBudget:
    """ε spent (client-level, at `privacy.delta`), composed round by round from what each
    round did: how many clients it sampled, without replacement, from how many.

    Flower's strategies sample a fixed number, so the accountant's neighbouring relation is
    replace-one: replacing one client's data moves the sum of clipped updates by up to
    2 x clipping_norm, and the noise std (noise_multiplier x clipping_norm) is
    noise_multiplier / 2 times that sensitivity. Flower's own accountant takes one
    population for the whole run, so dp-accounting's is used directly. A round that sampled
    clients counts even when it aggregated nothing; a resumed run recomposes the rounds of
    its `history` (their `dp_*` fields).
    """

    def __init__(self, privacy: PrivacyConfig, history: list[dict] = ()) -> None:
        self.delta = privacy.delta
        self.target_epsilon = privacy.target_epsilon
        self.noise_multiplier = privacy.noise_multiplier
        self.accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        for record in history:
            if "dp_population" not in record:
                raise ConfigError("resume", "the run to continue was saved before fl_app recorded what each "
                                  "round did for privacy; its epsilon cannot be recomposed: start a new run")
            self._compose(self.accountant, record["dp_clients_sampled"], record["dp_population"])

    def _compose(self, accountant: RdpAccountant, sampled: int, population: int, count: int = 1) -> None:
        if sampled:  # a round that sampled no one released nothing
            accountant.compose(dp_event.SampledWithoutReplacementDpEvent(
                population, sampled, dp_event.GaussianDpEvent(self.noise_multiplier / 2)), count)

    def spend(self, record: dict) -> dict[str, Scalar]:
        """Account for the round of `record` (a strategy's round record); its DP fields."""
        sampled, population = record["clients_sampled"], record["clients_available"]
        self._compose(self.accountant, sampled, population)
        return {"dp_clients_sampled": sampled, "dp_clients_aggregated": record.get("dp_clients_aggregated", 0),
                "dp_population": population, "dp_noise_std": record.get("dp_noise_std", 0.0),
                "epsilon": self.epsilon}

    @property
    def epsilon(self) -> float:
        """ε spent by the rounds composed so far."""
        return self.accountant.get_epsilon(self.delta)

    def epsilon_after(self, rounds: int, sampled: int, population: int) -> float:
        """ε after `rounds` more rounds, each sampling `sampled` of `population` clients."""
        accountant = copy.deepcopy(self.accountant)
        self._compose(accountant, sampled, population, rounds)
        return accountant.get_epsilon(self.delta)

    def last_round(self, rounds_done: int, num_rounds: int, sampled: int, population: int) -> int:
        """`num_rounds`, or the last round that keeps ε within the target when each round
        samples `sampled` of `population`: decided before the run starts, so the run
        evaluates that round's model as its last.

        Raises `ConfigError` when a new run's first round alone takes ε above the target.
        """
        if self.target_epsilon is None:
            return num_rounds
        # ε only grows with rounds, so a bisection finds the last one within the target.
        more = range(1, num_rounds - rounds_done + 1)
        last = rounds_done + bisect.bisect_left(more, True, key=lambda rounds: self.epsilon_after(
            rounds, sampled, population) > self.target_epsilon)
        if last == 0:
            raise ConfigError(
                "privacy.target_epsilon",
                f"one round already takes epsilon above {self.target_epsilon} at delta "
                f"{self.delta}; raise it or privacy.noise_multiplier, or lower fraction_fit",
            )
        if last < num_rounds:
            log(INFO, "The privacy budget allows %s of %s rounds: another round would take epsilon "
                "above %s at delta %s", last, num_rounds, self.target_epsilon, self.delta)
        return last

    def allows_another(self, sampled: int, population: int) -> bool:
        """Whether one more round like this (`sampled` of `population`) keeps ε within the
        target; logs why not. In deployment the federation's size can change between rounds."""
        if self.target_epsilon is None or self.epsilon_after(1, sampled, population) <= self.target_epsilon:
            return True
        log(WARNING, "Stopping: another round sampling %s of %s clients would take epsilon above %s "
            "at delta %s", sampled, population, self.target_epsilon, self.delta)
        return False
