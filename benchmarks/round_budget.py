"""Where each worker's time goes in a round, seen from inside the workers.

    FL_APP_DATA_DIR=../shared/datasets python -m benchmarks.round_budget [--rounds 11]
        [--settings a b]

Runs settings (a) and (b) of `benchmarks.run` in its first configuration (the server
evaluating every 5 rounds), with a Flower client mod that records in each Ray worker when
every client call starts and ends and the CPU time the call used. Each worker's share of
rounds 2..N is then split into: its client calls, the gaps between them, the server's turn
(from the previous round's last reply to this round's messages), Flower handing those
messages to the worker, and waiting for the other workers' last calls. All of them are
shares of the same seconds, so the drift of this shared machine, which moves
`benchmarks.run`'s efficiency by 20-56 %, hardly moves them. The machine limit's processes
are then timed the same way (CPU seconds per second of training): if a CPU second trains
as much in both, the ratio of the two CPU shares is the efficiency.
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
from fl_app.config import compose_config
from fl_app.simulation import simulate

PARTS = (
    "in its client calls",
    "gaps between its calls",
    "the server's turn (last reply to next messages)",
    "Flower dispatching the messages to it",
    "waiting for the other workers' last calls",
)
CALLS, GAPS, SERVER, DISPATCH, WAITING = PARTS


def call_timer(folder: Path) -> Callable:
    """A Flower client mod that appends every call's timing to `folder/<worker pid>.jsonl`."""

    def timed(message, context, call_next):
        started, cpu = time.time(), time.process_time()
        reply = call_next(message, context)
        record = {
            "worker": os.getpid(),
            "type": message.metadata.message_type,
            "round": message.metadata.group_id,  # Flower's round loop sets it to the round
            "created": message.metadata.created_at,  # by the server, on the same clock
            "start": started,
            "end": time.time(),
            "cpu": time.process_time() - cpu,
        }
        with open(folder / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        return reply

    return timed


def budget(calls: list[dict]) -> tuple[dict[str, float], float, list[float]]:
    """Shares of the workers' time in rounds 2..N (PARTS), the CPU used per second inside
    the calls, and the seconds of each round (last reply of one round to the next's)."""
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
            seconds[CALLS] += sum(c["end"] - c["start"] for c in own)
            seconds[GAPS] += sum(b["start"] - a["end"] for a, b in zip(own, own[1:]))
            seconds[SERVER] += created - begin
            seconds[DISPATCH] += own[0]["start"] - created
            seconds[WAITING] += end - own[-1]["end"]
            cpu += sum(c["cpu"] for c in own)
    total = sum(seconds.values())
    return {part: value / total for part, value in seconds.items()}, cpu / seconds[CALLS], round_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11, help="rounds per run (round 1 is warm-up)")
    parser.add_argument("--settings", nargs="+", choices=[s[0] for s in SETTINGS],
                        default=[s[0] for s in SETTINGS], help="the settings to run (default: all)")
    args = parser.parse_args()
    label, overrides = FL_APP_VARIANTS[0]
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
        shares, cpu_per_second, round_seconds = budget(calls)
        print(f"\nsetting ({name}): {clients} clients, fraction_fit={fraction}, E={epochs}, B={batch}, "
              f"{label}; rounds 2..{args.rounds}, {statistics.median(round_seconds):.2f} s a round "
              f"(min {min(round_seconds):.2f}, max {max(round_seconds):.2f})")
        print("  share of each worker's time:")
        for part, share in shares.items():
            print(f"    {part:50s} {share:.3f}")
        print(f"  CPU used inside the calls: {cpu_per_second:.3f} of a core per second")
        trained = shares[CALLS] * cpu_per_second
        print(f"  so the workers trained {trained:.3f} of the machine's CPU time")
        cores = psutil.cpu_count()
        _, limit_cpu = samples_per_second(batch, cores, 1, cfg.steps_per_execution, repeats=3)
        print(f"  the machine limit's {cores} processes used {limit_cpu:.3f} of a core per second "
              f"of their training: the CPU time allows an efficiency of {trained / limit_cpu:.2f}")


if __name__ == "__main__":
    main()
