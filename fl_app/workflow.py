"""Flower's legacy round loop, made resumable.

`flwr.server.workflow.DefaultWorkflow` always starts at round 1 from fresh parameters
and offers no hook after a round, so a crashed run could not continue and nothing could
be saved per round. This loop runs Flower's own per-round workflows (fit, then
centralised and federated evaluation side by side) on a `LegacyContext`, but it starts
from given weights at a given round and calls back after every round. The fit step is
pluggable exactly as in DefaultWorkflow, so `SecAggPlusWorkflow` slots in unchanged.
Flower's per-round workflows wait for replies without a deadline; `round_timeout` gives
them one, so a node that hangs (alive, heartbeating, never answering) cannot stall a round.
"""

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
# Flower's per-round workflows and client-manager thread are not exported: a reliance on its
# internals (fl_app/library_patches.py, RELIANCES).
from flwr.app import ArrayRecord, ConfigRecord
from flwr.compat.server.typing import Workflow
from flwr.server import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_evaluate_workflow,
    default_fit_workflow,
)
from flwr.serverapp import Grid

# Called after each round with (round, global weights after it, seconds it took);
# returns True to end the run after this round.
RoundEndFn = Callable[[int, list[np.ndarray], float], bool]


class DeadlineGrid:
    """The run's grid, with every send-and-receive cut off after `timeout` seconds.

    Replies that miss the deadline are left out; the strategy counts them as failed.
    """

    def __init__(self, grid: Grid, timeout: float) -> None:
        self.grid = grid
        self.timeout = timeout

    def send_and_receive(self, messages, *, timeout: float | None = None):
        return self.grid.send_and_receive(messages, timeout=timeout or self.timeout)

    def __getattr__(self, name: str):
        return getattr(self.grid, name)


class ResumableWorkflow:
    """Run rounds `first_round..num_rounds` starting from `weights`, evaluating (server
    and clients) every `evaluate_every` rounds and at the last."""

    def __init__(
        self,
        weights: list[np.ndarray],
        first_round: int,
        on_round_end: RoundEndFn,
        round_timeout: float | None = None,
        evaluate_every: int = 1,
        fit_workflow: Workflow = default_fit_workflow,
        evaluate_workflow: Workflow = default_evaluate_workflow,
    ) -> None:
        self.weights = weights
        self.first_round = first_round
        self.on_round_end = on_round_end
        self.round_timeout = round_timeout
        self.evaluate_every = evaluate_every
        self.fit_workflow = fit_workflow
        self.evaluate_workflow = evaluate_workflow

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
        registered.wait()
        if self.round_timeout is not None:
            grid = DeadlineGrid(grid, self.round_timeout)
        central = ThreadPoolExecutor(max_workers=1, thread_name_prefix="centralised-evaluation")
        try:
            context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(self.weights)
            loop_config = ConfigRecord({Key.START_TIME: time.perf_counter()})
            context.state.config_records[MAIN_CONFIGS_RECORD] = loop_config
            for server_round in range(self.first_round, context.config.num_rounds + 1):
                loop_config[Key.CURRENT_ROUND] = server_round
                started = time.perf_counter()
                self.fit_workflow(grid, context)
                if server_round % self.evaluate_every == 0 or server_round == context.config.num_rounds:
                    # Both evaluations read the same new global model. The server evaluates while
                    # the clients do: alone, its test-set pass left them idle (docs/benchmarks.md).
                    evaluated = central.submit(default_centralized_evaluation_workflow, grid, context)
                    self.evaluate_workflow(grid, context)
                    evaluated.result()
                weights = context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
                if self.on_round_end(server_round, weights, time.perf_counter() - started):
                    break
        finally:
            central.shutdown()
            stop.set()
            thread.join()
