"""ServerApp: the configured (validated) strategy, centralised evaluation, the run's outputs.

Built on Flower's legacy path (`LegacyContext` + a DefaultWorkflow-style loop) because
that is where Flower's SecAgg+ workflow plugs in.
"""

import dataclasses
import time
import zipfile
from collections.abc import Callable, Mapping
from logging import ERROR, INFO, WARNING
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
from fl_app.console import FILE_ONLY, ReportedError, quiet_flower_stream
from fl_app.outputs import CLIENTS_COLUMNS, PER_CLASS_COLUMNS, Checkpoint, RunOutputs
from fl_app.partition import label_counts
from fl_app.privacy import PrivacyBudget, fit_workflow, with_central_dp
from fl_app.strategy import ValidatedStrategy, build_strategy
from fl_app.task import Task, central_test_set, task_of
from fl_app.workflow import ResumableWorkflow


class RoundRecorder:
    """After each round: log a progress line, write metrics (files and TensorBoard) and the
    per-class and per-party tables, checkpoint atomically, and end the run once its accuracy
    reaches `target_accuracy`.

    The run's accuracy is the server's test accuracy, or without a test set the clients'
    held-out (federated) accuracy: `accuracy_key`.
    """

    def __init__(self, outputs: RunOutputs, strategy: ValidatedStrategy, num_rounds: int,
                 checkpoint: Checkpoint, target_accuracy: float | None, class_names: tuple[str, ...],
                 accuracy_key: str, budget: PrivacyBudget | None = None) -> None:
        self.outputs = outputs
        self.strategy = strategy
        self.num_rounds = num_rounds
        self.target_accuracy = target_accuracy
        self.class_names = class_names
        self.accuracy_key = accuracy_key
        self.budget = budget
        self.confusion: tuple[int, np.ndarray] | None = None  # the latest summed counts, by round
        self.history = list(checkpoint.history)
        self.weights = checkpoint.weights
        self.first_round = checkpoint.round + 1
        self.started = time.monotonic()

    def __call__(self, server_round: int, weights: list[np.ndarray], seconds: float) -> bool:
        record = {"round": server_round, **self.strategy.rounds.get(server_round, {})}
        record["round_seconds"] = round(seconds, 3)
        # What each sampled client received, and sent back: the weights that travel.
        record["bytes_per_client"] = sum(w.nbytes for w in weights)
        self._record_evaluation(server_round, record)
        if self.budget is not None:
            record.update(self.budget.spend(record))
        self.history.append(record)
        self.weights = weights
        elapsed = time.monotonic() - self.started
        # The rounds after this process's first (which waits for the workers to start).
        later = [r["round_seconds"] for r in self.history if r["round"] > self.first_round] or [seconds]
        left = sum(later) / len(later) * (self.num_rounds - server_round)
        log(INFO, "%s | %s elapsed, ~%s left", progress_line(record, self.num_rounds, self.accuracy_key),
            minutes(elapsed), minutes(left))
        # The checkpoint first: it decides whether a run exists to resume, and a resume
        # rewrites the metrics from its history.
        self.outputs.save_checkpoint(Checkpoint(server_round, weights, self.history,
                                                self.strategy.optimizer_state()))
        self.outputs.write_metrics(self.history)
        self.outputs.write_scalars(record)
        reached = self.target_accuracy is not None and record.get(self.accuracy_key, 0.0) >= self.target_accuracy
        if reached:
            log(INFO, "Target accuracy %s reached in round %s: stopping", self.target_accuracy, server_round)
        spent = (self.budget is not None and server_round < self.num_rounds
                 and not self.budget.allows_another(record["clients_sampled"], record["clients_available"]))
        return reached or spent

    def _record_evaluation(self, server_round: int, record: dict) -> None:
        """clients.csv, and from the clients' summed confusion counts per_class.csv and the
        record's eval_macro_f1."""
        parties = self.strategy.parties.pop(server_round, None)
        if parties is not None:
            self.outputs.write_round_rows(self.outputs.clients_csv, CLIENTS_COLUMNS, server_round, parties)
        confusion = self.strategy.confusion.pop(server_round, None)
        if confusion is None or len(confusion) != len(self.class_names):
            return
        self.confusion = server_round, confusion
        scores = keras_model.class_scores(confusion)
        record["eval_macro_f1"] = scores.macro_f1
        rows = [{"class": name, "precision": round(float(p), 6), "recall": round(float(r), 6),
                 "f1": round(float(f), 6), "support": int(n)}
                for name, p, r, f, n in zip(self.class_names, *scores[:4])]
        self.outputs.write_round_rows(self.outputs.per_class_csv, PER_CLASS_COLUMNS, server_round, rows)


class RunFailed(ReportedError):
    """The run trained nothing: every round it ran failed. Raised at its end, so that
    `flwr list` shows it failed and run_simulation.py exits non-zero."""


def check_something_trained(history: list[dict], first_round: int, why_failed: dict[int, str]) -> None:
    """Raise `RunFailed`, saying why in the log's last line, when every round from
    `first_round` on failed (a resumed run is judged by the rounds it ran itself)."""
    ran = [record for record in history if record["round"] >= first_round]
    if not ran or any(record.get("status") == "ok" for record in ran):
        return
    last = ran[-1]["round"]
    reason = (f"Run failed: none of its {len(ran)} round(s) aggregated an update, so the model is the "
              f"one it started from. Round {last}: {why_failed.get(last, 'no client replied')}")
    log(ERROR, "%s", reason)
    raise RunFailed(reason)


def minutes(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def progress_line(record: dict, num_rounds: int, accuracy_key: str) -> str:
    """One round in a line; `accuracy_key` says which evaluation measures the run."""
    def fmt(key: str) -> str:
        return f"{record[key]:.4f}" if key in record else "-"

    evaluation = accuracy_key.split("_")[0]  # test: the server's test set; eval: the clients'
    return (
        f"[round {record['round']}/{num_rounds}] "
        f"clients {record.get('clients_succeeded', 0)}/{record.get('clients_sampled', 0)} trained"
        f" ({record.get('clients_failed', 0)} failed) | train loss {fmt('train_loss')} | "
        f"{evaluation} loss {fmt(f'{evaluation}_loss')} acc {fmt(accuracy_key)} | {record['round_seconds']:.1f} s"
        + (f" | epsilon {record['epsilon']:.3f}" if "epsilon" in record else "")
    )


def run_header(cfg: AppConfig, task: Task, num_params: int, exchanged: NDArrays, sampled: int,
               output_dir: Path, has_test_set: bool) -> str:
    """What the run trains, on what, how and where its outputs go: the console's first lines."""
    privacy = [name for name, on in (("SecAgg+", cfg.privacy.secagg),
                                     (f"DP {cfg.privacy.dp}", cfg.privacy.dp != "none")) if on]
    if has_test_set:
        measured = ""
    elif cfg.fraction_evaluate > 0:
        measured = "\nNo test set: the clients' held-out images measure the run"
    else:
        measured = "\nNo test set and fraction_evaluate=0: nothing measures the run's accuracy"
    count, megabytes = sum(w.size for w in exchanged), sum(w.nbytes for w in exchanged) / 1e6
    travel = f"{megabytes:.1f} MB" if count == num_params else f"the head's {count:,} ({megabytes:.2f} MB)"
    return (f"{cfg.model.name} ({num_params:,} parameters; {travel} to and from each client a round) "
            f"on {cfg.dataset.name} "
            f"({'x'.join(map(str, task.image_shape))}, {len(task.classes)} classes) | "
            f"{cfg.strategy.name}, {sampled} of {cfg.num_clients} clients a round, {cfg.num_rounds} rounds | "
            f"privacy: {' + '.join(privacy) or 'none'}{measured}\nOutputs: {output_dir}")


def check_output_dir(cfg: AppConfig) -> None:
    """Refuse an output_dir that holds a run unless resume=true: no run is overwritten."""
    if cfg.output_dir and not cfg.resume and RunOutputs(cfg.output_dir).checkpoint.exists():
        raise ConfigError("output_dir", f"{Path(cfg.output_dir).resolve()} already holds a run; set "
                          "resume=true to continue it or choose another output_dir")


def _checkpoint_to_resume(cfg: AppConfig, outputs: RunOutputs) -> Checkpoint | None:
    """The checkpoint to continue from, or None to start at round 1."""
    check_output_dir(cfg)
    try:
        checkpoint = outputs.load_checkpoint()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ConfigError("resume", f"{outputs.checkpoint} cannot be read ({type(err).__name__}: {err}); "
                          "move it away to start this output_dir again, or choose another") from None
    if checkpoint is not None:
        log(INFO, "Resuming %s after round %s", outputs.dir, checkpoint.round)
        return checkpoint
    if cfg.resume:
        log(INFO, "No checkpoint in %s: starting at round 1", outputs.dir)
    return None


def frozen(cfg: AppConfig) -> bool:
    """Whether the model's backbone is frozen: only its head trains and travels."""
    return cfg.model.train == "head"


def record_partitions(cfg: AppConfig, outputs: RunOutputs) -> None:
    """partitions.json/png: what each client holds (simulation: the server knows the split)."""
    task = task_of(cfg.dataset)
    counts = label_counts(task, cfg.partitioner.name, cfg.num_clients, cfg.seed, **own_settings(cfg.partitioner))
    outputs.write_partitions(counts)
    if task.clients_dir:
        title, names = f"the party folders of {task.clients_dir}", task.parties
    else:
        title, names = f"{cfg.partitioner.name} partitions of {cfg.dataset.name}", [str(i) for i in range(len(counts))]
    outputs.plot_partitions(counts, title, task.classes, names)


def open_outputs(cfg: AppConfig) -> tuple[RunOutputs, Checkpoint | None]:
    """The run's output directory and the checkpoint to continue from (None: a fresh start)."""
    output_dir = cfg.output_dir or Path("outputs/flwr") / time.strftime("%Y-%m-%d_%H-%M-%S")
    outputs = RunOutputs(Path(output_dir).resolve())
    return outputs, _checkpoint_to_resume(cfg, outputs)


def record_run(cfg: AppConfig, outputs: RunOutputs) -> None:
    """config.yaml, and in simulation what each client holds (in deployment only the
    partners know their data)."""
    outputs.write_config(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if cfg.mode.name == "simulation":
        record_partitions(cfg, outputs)


def global_model(cfg: AppConfig, task: Task, outputs: RunOutputs) -> keras.Model:
    """The server's copy of the model (it evaluates and saves the global weights), described
    in the log and model_summary.txt. Built with the run's seed, as the clients build theirs:
    a frozen backbone is the same everywhere."""
    model = keras_model.build_model(cfg.model.name, task.image_shape, len(task.classes), cfg.optimizer,
                                    cfg.loss, cfg.learning_rate, steps_per_execution=cfg.steps_per_execution,
                                    weights=cfg.model.weights, frozen=frozen(cfg), init_from=cfg.init_from,
                                    seed=cfg.seed)
    summary = keras_model.summary_text(model)
    log(INFO, "Global model:\n%s", summary, extra=FILE_ONLY)
    outputs.write_model_summary(summary)
    return model


def server_strategy(cfg: AppConfig, checkpoint: Checkpoint, evaluate_fn,
                    frozen_digest: str | None = None) -> ValidatedStrategy:
    """The configured Flower strategy, validated, under the configured privacy, continuing
    from `checkpoint`; `frozen_digest`: the frozen backbone's every update must be on."""
    strategy = build_strategy(
        cfg.strategy.name,
        own_settings(cfg.strategy),
        checkpoint.weights,
        wrap=lambda inner: with_central_dp(inner, cfg.privacy),
        secure_aggregation=cfg.privacy.secagg,
        # Central DP's epsilon counts on no one knowing who was sampled: a draw that anyone
        # with the config's seed could recompute would void that amplification.
        sampling_seed=None if cfg.privacy.dp in CENTRAL_DP else cfg.seed,
        frozen_digest=frozen_digest,
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
        on_evaluate_config_fn=lambda server_round: {"server_round": server_round},
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


def save_final_model(model: keras.Model, weights: NDArrays, frozen: bool, outputs: RunOutputs, task: Task,
                     test: tuple[np.ndarray, np.ndarray] | None, recorder: RoundRecorder,
                     batch_size: int) -> None:
    """model.keras, and pictures of what it predicts: on the test set, or without one the
    confusion matrix of the clients' summed counts in the last evaluated round."""
    keras_model.set_exchanged_weights(model, weights, frozen)
    model.optimizer.build(model.trainable_variables)  # else loading warns of missing slots
    model.save(outputs.model)
    if test is not None:
        x_test, y_test = test
        predicted = keras_model.evaluate(model, x_test, y_test, batch_size).predicted
        confusion = keras_model.confusion_counts(y_test, predicted, len(task.classes))
        outputs.plot_confusion_matrix(confusion, task.classes, "test images")
        outputs.plot_predictions(x_test, y_test, predicted, task.classes)
    elif recorder.confusion is not None:
        server_round, confusion = recorder.confusion
        outputs.plot_confusion_matrix(confusion, task.classes,
                                      f"clients' held-out images (their summed counts, round {server_round})")


def run_server(grid: Grid, context: Context, cfg: AppConfig, log_file: bool = False) -> None:
    """Train for `cfg.num_rounds` rounds, writing everything into the output directory;
    `log_file`: the log too, as server.log (under `flwr run`; run_simulation.py keeps its own)."""
    started = time.monotonic()
    outputs, checkpoint = open_outputs(cfg)
    if log_file:
        outputs.dir.mkdir(parents=True, exist_ok=True)
        quiet_flower_stream(outputs.dir / "server.log", cfg.verbose)
    # The data first: a missing or corrupt file stops the run before anything is written.
    task = task_of(cfg.dataset)
    test = central_test_set(task)
    record_run(cfg, outputs)
    model = global_model(cfg, task, outputs)
    if checkpoint is None:  # a fresh start: round 0 holds the seed's initial weights
        checkpoint = Checkpoint(0, keras_model.exchanged_weights(model, frozen(cfg)), [], {})

    def evaluate_fn(server_round: int, weights: NDArrays, config: dict[str, Scalar]):
        keras_model.set_exchanged_weights(model, weights, frozen(cfg))
        result = keras_model.evaluate(model, *test, cfg.eval_batch_size)
        return result.loss, {"accuracy": result.accuracy}

    strategy = server_strategy(cfg, checkpoint, evaluate_fn if test is not None else None,
                               keras_model.frozen_digest(model) if frozen(cfg) else None)
    # Clients a round when all of num_clients are connected, as the strategy itself counts them.
    sampled, _ = strategy.optimizer.num_fit_clients(cfg.num_clients)
    log(INFO, "%s", run_header(cfg, task, model.count_params(), checkpoint.weights, sampled, outputs.dir,
                               test is not None))
    if test is not None:
        # The starting model's test accuracy, as Flower's own server loop logs it. Evaluating it
        # now (in simulation while Ray starts) also warms TensorFlow up for the rounds' evaluations.
        loss, metrics = evaluate_fn(checkpoint.round, checkpoint.weights, {})
        log(INFO, "Global model at the start (round %s): test loss %.4f acc %.4f",
            checkpoint.round, loss, metrics["accuracy"])

    if frozen(cfg) and cfg.model.weights is None and cfg.init_from is None:
        log(WARNING, "model.train=head on a random backbone (model.weights=null, no init_from): its "
            "features teach the head little; start from imagenet, a weights file or init_from")
    budget, num_rounds = privacy_plan(cfg, checkpoint, sampled)
    accuracy_key = "test_accuracy" if test is not None else "eval_accuracy"
    recorder = RoundRecorder(outputs, strategy, num_rounds, checkpoint, cfg.target_accuracy, task.classes,
                             accuracy_key, budget)
    workflow = ResumableWorkflow(checkpoint.weights, checkpoint.round + 1, recorder, cfg.round_timeout,
                                 evaluate_every=cfg.eval_every, fit_workflow=fit_workflow(cfg.privacy))
    workflow(grid, LegacyContext(context, ServerConfig(num_rounds=num_rounds), strategy))

    outputs.plot_metrics(recorder.history)
    outputs.plot_clients()
    save_final_model(model, recorder.weights, frozen(cfg), outputs, task, test, recorder, cfg.eval_batch_size)
    final = next((r for r in reversed(recorder.history) if accuracy_key in r), {})
    log(
        INFO,
        "Final %s accuracy %s after %s rounds, %s in all. Outputs in %s",
        "test" if test is not None else "federated (clients' held-out)",
        f"{final[accuracy_key]:.4f}" if final else "n/a",
        len(recorder.history),
        minutes(time.monotonic() - started),
        outputs.dir,
    )
    check_something_trained(recorder.history, checkpoint.round + 1, strategy.why_failed)


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
    if cfg.dataset.clients_dir:
        raise ConfigError("dataset.clients_dir", f"holds {cfg.num_clients} party folders, but the "
                          f"federation has {len(nodes)} SuperNodes: one each")
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
        if cfg is not None:
            run_server(grid, context, cfg)
        else:
            run_server(grid, context, federation_config(grid, context.run_config), log_file=True)

    return server_app


app = build_server_app()
