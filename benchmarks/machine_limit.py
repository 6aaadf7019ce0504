"""The machine limit: plain Keras training of the same model on the same MNIST samples.

No federation at all: each process builds the model once, warms up, then trains epochs
of real MNIST images while the others do the same, started together at a barrier. Training
goes through `fl_app.model.train` (Keras `fit` on a tf.data pipeline with autotune off, the
model compiled with fl_app's `steps_per_execution`), the fastest plain-Keras way measured
here: `fit` on NumPy arrays stalled for seconds in some epochs, a `train_on_batch` loop was
no faster, and one batch per TensorFlow call (Keras' default) was slower.
Each process then times Keras' fixed cost of a fit call, for `benchmarks.round_budget`.
"""

import multiprocessing as mp
import os
import queue
import statistics
import time
from typing import NamedTuple

from fl_app.config import compose_config

TRAIN_SAMPLES = 20_000


def _train(data_dir: str, batch_size: int, threads: int, steps_per_execution: int, repeats: int,
           barrier, results) -> None:
    # As Ray does for its workers: oneDNN's OpenMP pool would otherwise take every core.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from fl_app import model as keras_model
    from fl_app.config_schema import DatasetConfig
    from fl_app.partition import load_client_data
    from fl_app.task import task_of

    keras_model.limit_threads(threads)
    data = load_client_data(task_of(DatasetConfig("mnist", data_dir, 0.0)), "iid", 0, 3, 0.0, 0)
    x, y = data.x_train[:TRAIN_SAMPLES], data.y_train[:TRAIN_SAMPLES]
    model = keras_model.build_model("seed_cnn", (28, 28, 1), 10, "adam", "sparse_categorical_crossentropy", 1e-3,
                                    steps_per_execution=steps_per_execution)

    def seconds_to_train(images: int) -> float:
        started = time.perf_counter()
        keras_model.train(model, x[:images], y[:images], epochs=1, batch_size=batch_size, learning_rate=1e-3,
                          seed=0)
        return time.perf_counter() - started

    seconds_to_train(len(x))  # warm-up: traces the training step
    runs = []
    for _ in range(repeats):
        barrier.wait()
        started, cpu = time.monotonic(), time.process_time()  # monotonic: system-wide
        seconds_to_train(len(x))
        runs.append((len(x), started, time.monotonic(), time.process_time() - cpu))
    # Keras' fixed cost of a fit call (a new input pipeline and iterator, the optimizer's
    # reset), which a federated client pays at every call and this loop once per repeat:
    # a fit of one batch, less that batch at this process's own training speed.
    seconds_per_image = statistics.median(end - start for _, start, end, _ in runs) / len(x)
    one_batch = statistics.median(seconds_to_train(batch_size) for _ in range(20))
    results.put((runs, one_batch - batch_size * seconds_per_image))


class LimitMeasure(NamedTuple):
    rates: list[float]  # aggregate samples/s of all processes, one per repeat
    cpu_per_second: float  # CPU seconds a process used per second of its training (mean)
    fit_fixed_seconds: float  # Keras' fixed cost of one fit call (median of the processes')


def samples_per_second(batch_size: int, processes: int, threads: int, steps_per_execution: int,
                       repeats: int = 5) -> LimitMeasure:
    """The machine limit of `processes` concurrent trainers: their samples/s, the CPU they
    used and Keras' fixed cost of a fit call."""
    data_dir = compose_config([]).dataset.data_dir  # as fl_app reads MNIST: $FL_APP_DATA_DIR, else ./data
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [
        ctx.Process(target=_train,
                    args=(data_dir, batch_size, threads, steps_per_execution, repeats, barrier, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    reports = []  # one (runs, fit fixed cost) per process
    try:
        while len(reports) < processes:
            try:
                reports.append(results.get(timeout=1))
            except queue.Empty:
                # A process that failed (its traceback is above) leaves the others at the barrier.
                if any(worker.exitcode not in (None, 0) for worker in workers):
                    raise RuntimeError("a machine-limit process failed; its error is printed above") from None
    finally:
        for worker in workers:
            if worker.exitcode is None and len(reports) < processes:
                worker.terminate()
            worker.join()
    rates = []
    for repeat in range(repeats):
        same = [runs[repeat] for runs, _ in reports]
        wall = max(end for _, _, end, _ in same) - min(start for _, start, _, _ in same)
        rates.append(sum(samples for samples, _, _, _ in same) / wall)
    cpu_per_second = statistics.mean(cpu / (end - start) for runs, _ in reports for _, start, end, cpu in runs)
    return LimitMeasure(rates, cpu_per_second, statistics.median(fixed for _, fixed in reports))
