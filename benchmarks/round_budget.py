"""Where each worker's time goes in a round, seen from inside the workers.

    FL_APP_DATA_DIR=../shared/datasets python -m benchmarks.round_budget [--rounds 11]
        [--settings a b] [--every-round]

Runs settings (a) and (b) of `benchmarks.run` in its first configuration (the server
evaluating every 5 rounds; with --every-round its second, the server evaluating every
round), with a Flower client mod that records in each Ray worker when
every client call starts and ends, the CPU time it used and the seconds it spent in
`fl_app.model.train`. Each worker's share of rounds 2..N is then split into: training, the
rest of its client calls (Flower's message, the client's data and weights), the gaps
between them, the server's turn (from the previous round's last reply to this round's
messages), Flower handing those messages to the worker, and waiting for the other workers'
last calls. All of them are shares of the same seconds, so the drift of this shared
machine, which moves `benchmarks.run`'s efficiency by 20-56 %, hardly moves them. Training
also holds Keras' fixed cost of each `fit` call, which the limit pays once per 20,000
images: the machine limit's processes time it (a fit of one batch, less that batch), and it
is taken out. They are timed the same way too (CPU seconds per second of training): if a
CPU second trains as much in both, the ratio of the two CPU shares is the efficiency.
Timings are measured, never asserted.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import psutil

from benchmarks.machine_limit import samples_per_second
from benchmarks.run import FL_APP_VARIANTS, SETTINGS
from fl_app import model as keras_model
from fl_app.config import compose_config
from fl_app.simulation import simulate

PARTS = (
    "training",
    "Keras' fixed cost of its fit calls",
    "the rest of its client calls",
    "gaps between its calls",
    "the server's turn (last reply to next messages)",
    "Flower dispatching the messages to it",
    "waiting for the other workers' last calls",
)
TRAINING, FIT_FIXED, REST, GAPS, SERVER, DISPATCH, WAITING = PARTS


def time_training() -> Callable:
    """`fl_app.model.train` in this process, wrapped (once) to add up the seconds spent in it
    (its attribute `seconds`): the client calls it through the module, so it sees the wrapper."""
    if not hasattr(keras_model.train, "seconds"):
        train = keras_model.train

        def timed_train(*args, **kwargs):
            started = time.perf_counter()
            try:
                return train(*args, **kwargs)
            finally:
                timed_train.seconds += time.perf_counter() - started

        timed_train.seconds = 0.0
        keras_model.train = timed_train
    return keras_model.train


def call_timer(folder: Path) -> Callable:
    """A Flower client mod that appends every call's timing to `folder/<worker pid>.jsonl`."""

    def timed(message, context, call_next):
        training = time_training()
        started, cpu, trained = time.time(), time.process_time(), training.seconds
        reply = call_next(message, context)
        record = {
            "worker": os.getpid(),
            "type": message.metadata.message_type,
            "round": message.metadata.group_id,  # Flower's round loop sets it to the round
            "created": message.metadata.created_at,  # by the server, on the same clock
            "start": started,
            "end": time.time(),
            "cpu": time.process_time() - cpu,
            "training": training.seconds - trained,
        }
        with open(folder / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        return reply

    return timed


def budget(calls: list[dict], fit_fixed_cost: float = 0.0) -> tuple[dict[str, float], float, list[float]]:
    """Shares of the workers' time in rounds 2..N (PARTS), the CPU used per second inside
    the calls, and the seconds of each round (last reply of one round to the next's).

    Each call's seconds in `fl_app.model.train` are training, less `fit_fixed_cost`."""
    rounds = defaultdict(list)
    for call in calls:
        if call["type"] == "train":
            rounds[int(call["round"])].append(call)
    order = sorted(rounds)
    workers = {call["worker"] for call in calls}
    seconds = dict.fromkeys(PARTS, 0.0)
    round_seconds, cpu = [], 0.0
    for previous, current in zip(order, order[1:]):
        begin = max(call["end"] for call in rounds[previous])
        end = max(call["end"] for call in rounds[current])
        created = min(call["created"] for call in rounds[current])
        round_seconds.append(end - begin)
        for worker in workers:
            own = sorted((c for c in rounds[current] if c["worker"] == worker), key=lambda c: c["start"])
            if not own:
                seconds[WAITING] += end - begin
                continue
            seconds[TRAINING] += sum(c["training"] - fit_fixed_cost for c in own)
            seconds[FIT_FIXED] += fit_fixed_cost * len(own)
            seconds[REST] += sum(c["end"] - c["start"] - c["training"] for c in own)
            seconds[GAPS] += sum(b["start"] - a["end"] for a, b in zip(own, own[1:]))
            seconds[SERVER] += created - begin
            seconds[DISPATCH] += own[0]["start"] - created
            seconds[WAITING] += end - own[-1]["end"]
            cpu += sum(c["cpu"] for c in own)
    total = sum(seconds.values())
    in_calls = seconds[TRAINING] + seconds[FIT_FIXED] + seconds[REST]
    return {part: value / total for part, value in seconds.items()}, cpu / in_calls, round_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11, help="rounds per run (round 1 is warm-up)")
    parser.add_argument("--settings", nargs="+", choices=[s[0] for s in SETTINGS],
                        default=[s[0] for s in SETTINGS], help="the settings to run (default: all)")
    # Only configurations without the clients' evaluation: its calls would blur the parts.
    parser.add_argument("--every-round", action="store_true",
                        help="the server evaluating every round instead of every 5 rounds")
    args = parser.parse_args()
    label, overrides = FL_APP_VARIANTS[1 if args.every_round else 0]
    for name, clients, fraction, epochs, batch in (s for s in SETTINGS if s[0] in args.settings):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            cfg = compose_config([
                f"num_clients={clients}", f"fraction_fit={fraction}", f"local_epochs={epochs}",
                f"batch_size={batch}", f"num_rounds={args.rounds}", f"output_dir={folder / 'run'}",
                *overrides,
            ])
            simulate(cfg, (call_timer(folder),))
            calls = [json.loads(line) for path in folder.glob("*.jsonl")
                     for line in path.read_text(encoding="utf-8").splitlines()]
        cores = psutil.cpu_count()
        limit = samples_per_second(batch, cores, 1, cfg.steps_per_execution, repeats=3)
        shares, cpu_per_second, round_seconds = budget(calls, limit.fit_fixed_seconds)
        print(f"\nsetting ({name}): {clients} clients, fraction_fit={fraction}, E={epochs}, B={batch}, "
              f"{label}; rounds 2..{args.rounds}, {statistics.median(round_seconds):.2f} s a round "
              f"(min {min(round_seconds):.2f}, max {max(round_seconds):.2f})")
        print("  share of each worker's time:")
        for part, share in shares.items():
            print(f"    {part:50s} {share:.3f}")
        print(f"  (Keras' fixed cost of a fit call, timed by the machine limit's processes: "
              f"{1000 * limit.fit_fixed_seconds:.1f} ms)")
        print(f"  CPU used inside the calls: {cpu_per_second:.3f} of a core per second")
        trained = shares[TRAINING] * cpu_per_second
        print(f"  so the workers trained {trained:.3f} of the machine's CPU time")
        print(f"  the machine limit's {cores} processes used {limit.cpu_per_second:.3f} of a core per second "
              f"of their training: the CPU time allows an efficiency of {trained / limit.cpu_per_second:.2f}")


if __name__ == "__main__":
    main()
