"""ServerApp: the configured (validated) strategy, centralised evaluation, the run's outputs.

Built on Flower's legacy path (`LegacyContext` + a DefaultWorkflow-style loop) because
that is where Flower's SecAgg+ workflow plugs in.
"""

import dataclasses
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path

import keras
import numpy as np
from flwr.common import Context, NDArrays, Scalar, log
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from fl_app import model as keras_model
from fl_app.config import from_run_config, given_keys
from fl_app.config_schema import CENTRAL_DP, AppConfig, ConfigError, own_settings
from fl_app.console import FILE_ONLY
from fl_app.data import class_names, image_shape
from fl_app.outputs import Checkpoint, RunOutputs
from fl_app.partition import load_split, load_test_set
from fl_app.privacy import PrivacyBudget, fit_workflow, with_central_dp
from fl_app.strategy import ValidatedStrategy, build_strategy
from fl_app.workflow import ResumableWorkflow


class RoundRecorder:
    """After each round: log a progress line, write metrics (files and TensorBoard),
    checkpoint atomically, and end the run once the test accuracy reaches `target_accuracy`."""

    def __init__(self, outputs: RunOutputs, strategy: ValidatedStrategy, num_rounds: int,
                 checkpoint: Checkpoint, target_accuracy: float | None,
                 budget: PrivacyBudget | None = None) -> None:
        self.outputs = outputs
        self.strategy = strategy
        self.num_rounds = num_rounds
        self.target_accuracy = target_accuracy
        self.budget = budget
        self.history = list(checkpoint.history)
        self.weights = checkpoint.weights
        self.first_round = checkpoint.round + 1
        self.started = time.monotonic()

    def __call__(self, server_round: int, weights: list[np.ndarray], seconds: float) -> bool:
        record = {"round": server_round, **self.strategy.rounds.get(server_round, {})}
        record["round_seconds"] = round(seconds, 3)
        if self.budget is not None:
            record.update(self.budget.spend(record))
        self.history.append(record)
        self.weights = weights
        elapsed = time.monotonic() - self.started
        # The rounds after this process's first (which waits for the workers to start).
        later = [r["round_seconds"] for r in self.history if r["round"] > self.first_round] or [seconds]
        left = sum(later) / len(later) * (self.num_rounds - server_round)
        log(INFO, "%s | %s elapsed, ~%s left", progress_line(record, self.num_rounds),
            minutes(elapsed), minutes(left))
        # The checkpoint first: it decides whether a run exists to resume, and a resume
        # rewrites the metrics from its history.
        self.outputs.save_checkpoint(Checkpoint(server_round, weights, self.history,
                                                self.strategy.optimizer_state()))
        self.outputs.write_metrics(self.history)
        self.outputs.write_scalars(record)
        reached = self.target_accuracy is not None and record.get("test_accuracy", 0.0) >= self.target_accuracy
        if reached:
            log(INFO, "Target accuracy %s reached in round %s: stopping", self.target_accuracy, server_round)
        spent = (self.budget is not None and server_round < self.num_rounds
                 and not self.budget.allows_another(record["clients_sampled"], record["clients_available"]))
        return reached or spent


def minutes(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def progress_line(record: dict, num_rounds: int) -> str:
    def fmt(key: str) -> str:
        return f"{record[key]:.4f}" if key in record else "-"

    return (
        f"[round {record['round']}/{num_rounds}] "
        f"clients {record.get('clients_succeeded', 0)}/{record.get('clients_sampled', 0)} trained"
        f" ({record.get('clients_failed', 0)} failed) | train loss {fmt('train_loss')} | "
        f"test loss {fmt('test_loss')} acc {fmt('test_accuracy')} | {record['round_seconds']:.1f} s"
        + (f" | epsilon {record['epsilon']:.3f}" if "epsilon" in record else "")
    )


def run_header(cfg: AppConfig, num_params: int, shape: tuple[int, ...], sampled: int, output_dir: Path) -> str:
    """What the run trains, on what, how and where its outputs go: the console's first lines."""
    privacy = [name for name, on in (("SecAgg+", cfg.privacy.secagg),
                                     (f"DP {cfg.privacy.dp}", cfg.privacy.dp != "none")) if on]
    return (f"{cfg.model.name} ({num_params:,} parameters) on {cfg.dataset.name} "
            f"({'x'.join(map(str, shape))}, {len(class_names(cfg.dataset.name))} classes) | "
            f"{cfg.strategy.name}, {sampled} of {cfg.num_clients} clients a round, {cfg.num_rounds} rounds | "
            f"privacy: {' + '.join(privacy) or 'none'}\nOutputs: {output_dir}")


def _start_or_resume(cfg: AppConfig, outputs: RunOutputs) -> Checkpoint:
    """The checkpoint to continue from, or round 0 with the seed's initial weights."""
    checkpoint = outputs.load_checkpoint()
    if checkpoint is not None and not cfg.resume:
        raise ConfigError(
            "output_dir",
            f"{outputs.dir} already holds a run; set resume=true to continue it "
            "or choose another output_dir",
        )
    if checkpoint is not None:
        log(INFO, "Resuming %s after round %s", outputs.dir, checkpoint.round)
        return checkpoint
    if cfg.resume:
        log(INFO, "No checkpoint in %s: starting at round 1", outputs.dir)
    shape = image_shape(cfg.dataset.name)
    return Checkpoint(0, keras_model.initial_weights(cfg.model.name, shape, cfg.seed), [], {})


def record_partitions(cfg: AppConfig, outputs: RunOutputs) -> None:
    """partitions.json/png: what each client holds (simulation: the server knows the split)."""
    split = load_split(cfg.dataset.name, cfg.dataset.data_dir, cfg.partitioner.name,
                       cfg.num_clients, cfg.seed, **own_settings(cfg.partitioner))
    counts = split.label_counts()
    outputs.write_partitions(counts)
    outputs.plot_partitions(counts, title=f"{cfg.partitioner.name} partitions of {cfg.dataset.name}")


def open_outputs(cfg: AppConfig) -> tuple[RunOutputs, Checkpoint]:
    """The run's output directory and the checkpoint to continue from."""
    output_dir = cfg.output_dir or Path("outputs/flwr") / time.strftime("%Y-%m-%d_%H-%M-%S")
    outputs = RunOutputs(Path(output_dir).resolve())
    return outputs, _start_or_resume(cfg, outputs)


def record_run(cfg: AppConfig, outputs: RunOutputs) -> None:
    """config.yaml, and in simulation what each client holds (in deployment only the
    partners know their data)."""
    outputs.write_config(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if cfg.mode.name == "simulation":
        record_partitions(cfg, outputs)


def global_model(cfg: AppConfig, input_shape: tuple[int, ...], outputs: RunOutputs) -> keras.Model:
    """The server's copy of the model (it evaluates and saves the global weights), described
    in the log and model_summary.txt."""
    model = keras_model.build_model(cfg.model.name, input_shape, cfg.optimizer, cfg.loss,
                                    cfg.learning_rate, steps_per_execution=cfg.steps_per_execution)
    summary = keras_model.summary_text(model)
    log(INFO, "Global model:\n%s", summary, extra=FILE_ONLY)
    outputs.write_model_summary(summary)
    return model


def server_strategy(cfg: AppConfig, checkpoint: Checkpoint, evaluate_fn) -> ValidatedStrategy:
    """The configured Flower strategy, validated, under the configured privacy, continuing
    from `checkpoint`."""
    strategy = build_strategy(
        cfg.strategy.name,
        own_settings(cfg.strategy),
        checkpoint.weights,
        wrap=lambda inner: with_central_dp(inner, cfg.privacy),
        secure_aggregation=cfg.privacy.secagg,
        # Central DP's epsilon counts on no one knowing who was sampled: a draw that anyone
        # with the config's seed could recompute would void that amplification.
        sampling_seed=None if cfg.privacy.dp in CENTRAL_DP else cfg.seed,
        fraction_fit=cfg.fraction_fit,
        fraction_evaluate=cfg.fraction_evaluate,
        min_fit_clients=cfg.min_fit_clients,
        min_evaluate_clients=cfg.min_evaluate_clients,
        # Start once enough clients are connected to fill a round, as Flower does.
        min_available_clients=max(cfg.min_fit_clients, cfg.min_evaluate_clients),
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda server_round: {
            "server_round": server_round,
            "local_epochs": cfg.local_epochs,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
        },
    )
    strategy.restore_optimizer_state(checkpoint.optimizer_state)
    return strategy


def privacy_plan(cfg: AppConfig, checkpoint: Checkpoint, sampled: int) -> tuple[PrivacyBudget | None, int]:
    """Under central DP, the budget spent so far and the last round it allows when each
    round samples `sampled` of `num_clients`; else none and the configured rounds."""
    if cfg.privacy.dp not in CENTRAL_DP:
        return None, cfg.num_rounds
    budget = PrivacyBudget(cfg.privacy, checkpoint.history)
    return budget, budget.last_round(checkpoint.round, cfg.num_rounds, sampled, cfg.num_clients)


def save_final_model(model: keras.Model, weights: NDArrays, outputs: RunOutputs, x_test: np.ndarray,
                     y_test: np.ndarray, cfg: AppConfig) -> None:
    """model.keras, and pictures of what it predicts on the test set."""
    model.set_weights(weights)
    model.optimizer.build(model.trainable_variables)  # else loading warns of missing slots
    model.save(outputs.model)
    predicted = model.predict(x_test, batch_size=cfg.eval_batch_size, verbose=0).argmax(axis=1)
    names = class_names(cfg.dataset.name)
    outputs.plot_confusion_matrix(y_test, predicted, names)
    outputs.plot_predictions(x_test, y_test, predicted, names)


def run_server(grid: Grid, context: Context, cfg: AppConfig) -> None:
    """Train for `cfg.num_rounds` rounds, writing everything into the output directory."""
    started = time.monotonic()
    outputs, checkpoint = open_outputs(cfg)
    # The data first: a missing or corrupt file stops the run before anything is written.
    x_test, y_test = load_test_set(cfg.dataset.name, cfg.dataset.data_dir)
    record_run(cfg, outputs)
    model = global_model(cfg, x_test.shape[1:], outputs)

    def evaluate_fn(server_round: int, weights: NDArrays, config: dict[str, Scalar]):
        model.set_weights(weights)
        loss, accuracy = keras_model.evaluate(model, x_test, y_test, cfg.eval_batch_size)
        return loss, {"accuracy": accuracy}

    strategy = server_strategy(cfg, checkpoint, evaluate_fn)
    # Clients a round when all of num_clients are connected, as the strategy itself counts them.
    sampled, _ = strategy.optimizer.num_fit_clients(cfg.num_clients)
    log(INFO, "%s", run_header(cfg, model.count_params(), x_test.shape[1:], sampled, outputs.dir))
    # The starting model's test accuracy, as Flower's own server loop logs it. Evaluating it
    # now (in simulation while Ray starts) also warms TensorFlow up for the rounds' evaluations.
    loss, metrics = evaluate_fn(checkpoint.round, checkpoint.weights, {})
    log(INFO, "Global model at the start (round %s): test loss %.4f acc %.4f",
        checkpoint.round, loss, metrics["accuracy"])

    budget, num_rounds = privacy_plan(cfg, checkpoint, sampled)
    recorder = RoundRecorder(outputs, strategy, num_rounds, checkpoint, cfg.target_accuracy, budget)
    workflow = ResumableWorkflow(checkpoint.weights, checkpoint.round + 1, recorder, cfg.round_timeout,
                                 evaluate_every=cfg.eval_every, fit_workflow=fit_workflow(cfg.privacy))
    workflow(grid, LegacyContext(context, ServerConfig(num_rounds=num_rounds), strategy))

    outputs.plot_metrics(recorder.history)
    save_final_model(model, recorder.weights, outputs, x_test, y_test, cfg)
    final = recorder.history[-1] if recorder.history else {}
    log(
        INFO,
        "Final test accuracy %s after %s rounds, %s in all. Outputs in %s",
        f"{final['test_accuracy']:.4f}" if "test_accuracy" in final else "n/a",
        len(recorder.history),
        minutes(time.monotonic() - started),
        outputs.dir,
    )


def federation_config(grid: Grid, run_config: Mapping[str, object]) -> AppConfig:
    """The config of a `flwr run`, with `num_clients` the federation's size: the SuperNodes
    connected once enough are for a round (max(min_fit_clients, min_evaluate_clients)).

    The privacy budget's plan and the simulation's partition record count on it. A value
    given in the overrides that differs is overridden, with a warning (docs/privacy.md).
    """
    cfg = from_run_config(run_config)
    needed = max(cfg.min_fit_clients, cfg.min_evaluate_clients)
    if len(grid.get_node_ids()) < needed:
        log(INFO, "Waiting for %s SuperNodes to connect", needed)
    while len(nodes := grid.get_node_ids()) < needed:
        time.sleep(1)
    if len(nodes) == cfg.num_clients:
        return cfg
    if "num_clients" in given_keys(run_config):
        log(WARNING, "num_clients=%s was given, but the federation has %s SuperNodes: using %s",
            cfg.num_clients, len(nodes), len(nodes))
    else:
        log(INFO, "num_clients follows the federation: %s SuperNodes", len(nodes))
    return dataclasses.replace(cfg, num_clients=len(nodes))


def build_server_app(cfg: AppConfig | None = None, wrap_grid: Callable[[Grid], Grid] | None = None) -> ServerApp:
    """A ServerApp for `cfg`, or (cfg=None, under `flwr run`) for the run config's, sized
    to the federation; `wrap_grid` wraps the grid it is given (the simulation's)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        grid = wrap_grid(grid) if wrap_grid else grid
        run_server(grid, context, cfg or federation_config(grid, context.run_config))

    return server_app


app = build_server_app()
