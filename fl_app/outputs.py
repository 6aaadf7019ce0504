"""A run's output directory: per-round metrics (files, plot, TensorBoard), checkpoint,
final model and pictures of its test-set predictions.

No Flower here. Files that a crash could leave half-written (metrics, checkpoint) are
written to a temporary file first and renamed into place, so a reader or a resumed run
only ever sees a complete one.
"""

import csv
import io
import json
import numbers
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator

# Column order of metrics.csv; keys a round lacks stay empty.
COLUMNS = (
    "round",
    "test_loss",
    "test_accuracy",
    "train_loss",
    "train_accuracy",
    "eval_loss",
    "eval_accuracy",
    "eval_macro_f1",
    "clients_sampled",
    "clients_succeeded",
    "clients_failed",
    "train_examples",
    "status",
    "round_seconds",
)

PER_CLASS_COLUMNS = ("round", "class", "precision", "recall", "f1", "support")
CLIENTS_COLUMNS = ("round", "client", "train_examples", "eval_examples", "eval_loss", "eval_accuracy")

DPI = 100  # every picture's pixel size is its figsize (inches) x DPI


class Checkpoint(NamedTuple):
    round: int
    weights: list[np.ndarray]
    history: list[dict]
    optimizer_state: dict[str, list[np.ndarray]]  # the server optimiser's, by name


def _write_atomically(path: Path, write) -> None:
    """Call write(binary file) on a temporary file, then rename it to `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files; outputs are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


class RunOutputs:
    """Paths and writers of one run's output directory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.config = self.dir / "config.yaml"
        self.metrics_json = self.dir / "metrics.json"
        self.metrics_csv = self.dir / "metrics.csv"
        self.metrics_png = self.dir / "metrics.png"
        self.checkpoint = self.dir / "checkpoint.npz"
        self.model = self.dir / "model.keras"
        self.partitions_json = self.dir / "partitions.json"
        self.partitions_png = self.dir / "partitions.png"
        self.model_summary = self.dir / "model_summary.txt"
        self.confusion_matrix_png = self.dir / "confusion_matrix.png"
        self.predictions_png = self.dir / "predictions.png"
        self.per_class_csv = self.dir / "per_class.csv"
        self.clients_csv = self.dir / "clients.csv"
        self.clients_png = self.dir / "clients.png"
        self._tensorboard = None  # created at the first round: a refused run writes nothing
        self._tables_started: set[Path] = set()  # the per-round tables this process has trimmed

    def write_config(self, yaml_text: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml_text)

    def write_metrics(self, history: list[dict]) -> None:
        """metrics.json and metrics.csv, one record per completed round."""
        _write_atomically(self.metrics_json, lambda f: f.write(json.dumps(history, indent=2).encode()))
        extra = sorted({key for record in history for key in record} - set(COLUMNS))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=[*COLUMNS, *extra], restval="")
        writer.writeheader()
        writer.writerows(history)
        _write_atomically(self.metrics_csv, lambda f: f.write(text.getvalue().encode()))

    def write_round_rows(self, path: Path, columns: tuple[str, ...], server_round: int,
                         rows: list[dict]) -> None:
        """Append one round's rows to a per-round table (per_class.csv, clients.csv). The
        first write of this run's process first drops the rows of this round or later, and
        any row cut short: a run that stopped before its checkpoint repeats the round when
        resumed."""
        if path not in self._tables_started:
            kept = []
            if path.exists():
                with open(path, newline="") as f:
                    kept = [row for row in csv.DictReader(f)
                            if None not in row.values() and int(row["round"]) < server_round]
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=columns)
            writer.writeheader()
            writer.writerows(kept)
            _write_atomically(path, lambda f: f.write(text.getvalue().encode()))
            self._tables_started.add(path)
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=columns).writerows({"round": server_round} | row for row in rows)

    def write_scalars(self, record: dict) -> None:
        """TensorBoard: each numeric value of a round's record (named as in metrics.csv) at
        step = round, in the run's directory, so `tensorboard --logdir outputs/` shows every
        run under outputs/ side by side. A resumed run appends to the same directory."""
        if self._tensorboard is None:
            self._tensorboard = tf.summary.create_file_writer(str(self.dir))
        with self._tensorboard.as_default(step=record["round"]):
            for key, value in record.items():
                if key != "round" and isinstance(value, numbers.Real):
                    tf.summary.scalar(key, value)
        self._tensorboard.flush()

    def write_model_summary(self, summary: str) -> None:
        self.model_summary.write_text(summary + "\n")

    def plot_metrics(self, history: list[dict]) -> None:
        """metrics.png: accuracy and loss per round, centralised and federated."""
        fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
        for key, label in (("test", "centralised test"), ("eval", "clients' held-out"), ("train", "clients' train")):
            for ax, metric in ((acc_ax, "accuracy"), (loss_ax, "loss")):
                points = [(r["round"], r[f"{key}_{metric}"]) for r in history if f"{key}_{metric}" in r]
                if points:
                    ax.plot(*zip(*points), marker="o", label=label)
        for ax, metric in ((acc_ax, "accuracy"), (loss_ax, "loss")):
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            ax.legend()
        acc_ax.set_title("Accuracy per round")
        loss_ax.set_title("Loss per round")
        _save(fig, self.metrics_png)

    def plot_clients(self, max_lines: int = 10) -> None:
        """clients.png, from clients.csv: each party's held-out accuracy per round, a line
        each for up to `max_lines` parties, else the spread (lowest, median, highest) of the
        parties evaluated in each round. Nothing without clients.csv."""
        if not self.clients_csv.exists():
            return
        with open(self.clients_csv, newline="") as f:
            rows = [row for row in csv.DictReader(f) if row["eval_accuracy"]]
        if not rows:
            return
        by_client: dict[str, list[tuple[int, float]]] = {}
        by_round: dict[int, list[float]] = {}
        for row in rows:
            server_round, accuracy = int(row["round"]), float(row["eval_accuracy"])
            by_client.setdefault(row["client"], []).append((server_round, accuracy))
            by_round.setdefault(server_round, []).append(accuracy)
        fig, ax = plt.subplots(figsize=(8, 4.5))
        if len(by_client) <= max_lines:
            for client, points in by_client.items():
                ax.plot(*zip(*points), marker="o", label=client)
            ax.legend(title="party", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")
            ax.set_title("Each party's held-out accuracy per round")
        else:
            rounds = sorted(by_round)
            ax.fill_between(rounds, [min(by_round[n]) for n in rounds], [max(by_round[n]) for n in rounds],
                            alpha=0.3, label="lowest to highest party")
            ax.plot(rounds, [float(np.median(by_round[n])) for n in rounds], marker="o", label="median party")
            ax.legend()
            ax.set_title(f"Held-out accuracy of the parties evaluated each round ({len(by_client)} parties)")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        _save(fig, self.clients_png)

    def plot_confusion_matrix(self, matrix: np.ndarray, class_names: tuple[str, ...], images: str) -> None:
        """confusion_matrix.png: `images` (what they are) per (true, predicted) class, counts
        written in. Colours are on a log scale, else the diagonal's thousands hide the few
        mistakes."""
        n = len(class_names)
        norm = LogNorm(vmin=1, vmax=max(matrix.max(), 2))
        fig, ax = plt.subplots(figsize=(7, 6))
        image = ax.imshow(np.ma.masked_equal(matrix, 0), cmap="Blues", norm=norm)
        for (true, guess), count in np.ndenumerate(matrix):
            dark = count and norm(count) > 0.6
            ax.text(guess, true, str(count), ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
        ax.set_xticks(range(n), class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), class_names)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        accuracy = np.trace(matrix) / matrix.sum()
        ax.set_title(f"Final model on {matrix.sum():,} {images}:\naccuracy {accuracy:.2%}")
        fig.colorbar(image, ax=ax, label="images (log scale)")
        _save(fig, self.confusion_matrix_png)

    def plot_predictions(self, images: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                         class_names: tuple[str, ...], rows: int = 4, cols: int = 8) -> None:
        """predictions.png: a grid of test images titled with predicted and true class,
        mistakes in red. Up to half the grid are the first mistakes and the rest the first
        correct ones, in test-set order: the first images alone would rarely show one."""
        wrong = np.flatnonzero(predicted != labels)[: rows * cols // 2]
        right = np.flatnonzero(predicted == labels)[: rows * cols - len(wrong)]
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.8))
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        for ax, i in zip(axes.flat, np.sort(np.concatenate([wrong, right]))):
            ax.imshow(images[i].squeeze(), cmap="gray", vmin=0, vmax=1)
            mistake = predicted[i] != labels[i]
            ax.set_title(f"predicted {class_names[predicted[i]]}\ntrue {class_names[labels[i]]}",
                         fontsize=8, color="red" if mistake else "black")
            if mistake:
                ax.set_frame_on(True)
                for spine in ax.spines.values():
                    spine.set(color="red", linewidth=3)
        fig.suptitle(f"Final model on test images: {np.sum(predicted != labels):,} of "
                     f"{len(labels):,} wrong; the first {len(wrong)} mistakes (red) and the "
                     f"first {len(right)} correct")
        _save(fig, self.predictions_png)

    def write_partitions(self, counts: np.ndarray) -> None:
        """partitions.json: statistics of the split and each client's label counts."""
        sizes = counts.sum(axis=1)
        labels_held = (counts > 0).sum(axis=1)
        summary = {
            "clients": len(counts),
            "samples": int(sizes.sum()),
            "size_min": int(sizes.min()),
            "size_median": float(np.median(sizes)),
            "size_max": int(sizes.max()),
            "labels_per_client_min": int(labels_held.min()),
            "labels_per_client_mean": float(labels_held.mean()),
            "labels_per_client_max": int(labels_held.max()),
        }
        text = json.dumps({"summary": summary, "label_counts": counts.tolist()}, indent=1)
        _write_atomically(self.partitions_json, lambda f: f.write(text.encode()))

    def plot_partitions(self, counts: np.ndarray, title: str, class_names: tuple[str, ...],
                        client_names: list[str], max_clients: int = 50) -> None:
        """partitions.png: one bar per client (the first `max_clients`), split by class."""
        shown = counts[:max_clients]
        fig, ax = plt.subplots(figsize=(11, 1.5 + 0.18 * len(shown)))
        left = np.zeros(len(shown))
        colours = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
        for label in range(shown.shape[1]):
            ax.barh(np.arange(len(shown)), shown[:, label], left=left, color=colours(label % colours.N),
                    label=class_names[label])
            left += shown[:, label]
        ax.set_yticks(np.arange(len(shown)), client_names[:max_clients], fontsize="small")
        ax.invert_yaxis()
        ax.margins(y=0.01)
        ax.set_xlabel("images (training and held-out)")
        ax.set_ylabel("client")
        suffix = f" (first {len(shown)} of {len(counts)} clients)" if len(counts) > len(shown) else ""
        ax.set_title(title + suffix)
        ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")
        _save(fig, self.partitions_png)

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        arrays = {f"weight_{i:03d}": w for i, w in enumerate(checkpoint.weights)}
        arrays |= {f"optimizer_{name}_{i:03d}": a for name, state in checkpoint.optimizer_state.items()
                   for i, a in enumerate(state)}
        _write_atomically(
            self.checkpoint,
            lambda f: np.savez(
                f, round=checkpoint.round, history=json.dumps(checkpoint.history), **arrays
            ),
        )

    def load_checkpoint(self) -> Checkpoint | None:
        if not self.checkpoint.exists():
            return None
        with np.load(self.checkpoint) as data:
            weights = [data[key] for key in sorted(data.files) if key.startswith("weight_")]
            optimizer_state: dict[str, list[np.ndarray]] = {}
            for key in sorted(data.files):
                if key.startswith("optimizer_"):  # optimizer_<name>_<index>
                    optimizer_state.setdefault(key[len("optimizer_"):-4], []).append(data[key])
            return Checkpoint(int(data["round"]), weights, json.loads(str(data["history"])),
                              optimizer_state)
