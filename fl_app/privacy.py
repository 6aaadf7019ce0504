"""The server's side of privacy: Flower's DP strategy wrappers, its SecAgg+ workflow, and
the privacy budget spent, from Flower's RDP accountant (Google's dp-accounting).

What is ours is only the choice of pieces from the `privacy` config and the ε per round;
the clients' side (clipping, local noise, SecAgg+ masking) are Flower's client mods,
chosen in `client_app.py`.
"""

import bisect
from logging import INFO

from flwr.common import log
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, RdpAccountant, SamplingMethod
from flwr.serverapp import PrivacyConfig as AccountingConfig

from fl_app.config_schema import CENTRAL_DP, ConfigError, PrivacyConfig


def with_central_dp(strategy: Strategy, privacy: PrivacyConfig, num_sampled: int) -> Strategy:
    """`strategy` wrapped in Flower's central-DP wrapper that `privacy.dp` names: clipping
    each update to `clipping_norm` (on the server, or on the clients by their mod) and
    Gaussian noise of std noise_multiplier x clipping_norm / num_sampled on the average."""
    z, clip = privacy.noise_multiplier, privacy.clipping_norm
    if privacy.dp == "server_fixed":
        return DifferentialPrivacyServerSideFixedClipping(strategy, z, clip, num_sampled)
    if privacy.dp == "client_fixed":
        return DifferentialPrivacyClientSideFixedClipping(strategy, z, clip, num_sampled)
    return strategy


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
    """ε spent (client-level, at `privacy.delta`) after each round of central DP.

    Clients are sampled as Flower's strategies sample them: a fixed number, without
    replacement, from `population`; every round counts, even one that failed. A resumed
    run passes the rounds it already ran as `rounds_done`: they spent the budget too.
    """

    def __init__(self, privacy: PrivacyConfig, num_sampled: int, population: int,
                 rounds_done: int = 0) -> None:
        self.delta = privacy.delta
        self.target_epsilon = privacy.target_epsilon
        self.rounds = rounds_done
        self.event = GaussianPrivacyEvent(privacy.noise_multiplier, num_sampled, population)
        self.accountant = RdpAccountant(AccountingConfig(
            target_delta=privacy.delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.REPLACE_ONE,
            sampling_method=SamplingMethod.WITHOUT_REPLACEMENT,
        ))
        if rounds_done:
            self.accountant.compose(self.event, count=rounds_done)

    def spend(self) -> float:
        """Account for one more round; the total ε."""
        self.rounds += 1
        self.accountant.compose(self.event)
        return self.accountant.get_epsilon(self.delta)

    def last_round(self, num_rounds: int) -> int:
        """`num_rounds`, or the last round that keeps ε within the target: decided before
        the run starts, so the run evaluates that round's model as its last.

        Raises `ConfigError` when one round already takes ε above the target.
        """
        if self.target_epsilon is None:
            return num_rounds
        # ε only grows with rounds, so a bisection finds the last one within the target.
        more = range(1, num_rounds - self.rounds + 1)
        last = self.rounds + bisect.bisect_left(more, True, key=lambda rounds: self.accountant.would_exceed(
            self.event, max_epsilon=self.target_epsilon, count=rounds))
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
