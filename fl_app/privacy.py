"""The server's side of privacy: Flower's DP strategy wrappers, its SecAgg+ workflow, and
the privacy budget spent, from Flower's RDP accountant (Google's dp-accounting).

What is ours is only the choice of pieces from the `privacy` config and the ε per round;
the clients' side (clipping, local noise, SecAgg+ masking) are Flower's client mods,
chosen in `client_app.py`.
"""

import bisect

from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, RdpAccountant, SamplingMethod
from flwr.serverapp import PrivacyConfig as AccountingConfig

from fl_app.config_schema import CENTRAL_DP, PrivacyConfig


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
    replacement, from `population`; every round counts, even one that failed.
    """

    def __init__(self, privacy: PrivacyConfig, num_sampled: int, population: int) -> None:
        self.delta = privacy.delta
        self.target_epsilon = privacy.target_epsilon
        self.event = GaussianPrivacyEvent(privacy.noise_multiplier, num_sampled, population)
        self.accountant = RdpAccountant(AccountingConfig(
            target_delta=privacy.delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.REPLACE_ONE,
            sampling_method=SamplingMethod.WITHOUT_REPLACEMENT,
        ))

    def spend(self, rounds: int = 1) -> float:
        """Account for `rounds` more rounds; the total ε."""
        self.accountant.compose(self.event, count=rounds)
        return self.accountant.get_epsilon(self.delta)

    def rounds_within_target(self, max_rounds: int) -> int:
        """How many more rounds (at most `max_rounds`) keep ε within the target (all
        without one). ε only grows with rounds, so a bisection finds the last one."""
        if self.target_epsilon is None:
            return max_rounds
        return bisect.bisect_left(range(1, max_rounds + 1), True, key=lambda rounds: self.accountant.would_exceed(
            self.event, max_epsilon=self.target_epsilon, count=rounds))
