"""Measure fl_app's simulation against the machine limit and a plain Flower app, in one run.

    FL_APP_DATA_DIR=../shared/datasets python -m benchmarks.run [--rounds 11] [--skip-scale]
        [--settings a b] [--repeats 1]

Prints, side by side: plain Keras samples/s (the machine limit), fl_app's and a
quickstart-style Flower app's training throughput in settings (a) and (b) with their
ratios, the share of the CPU time fl_app's workers used, start-up time, and seconds per
round and peak memory with 1,000 and 10,000 virtual clients. A federation's throughput is
the samples trained in rounds 2..N over the wall time of those rounds, printed with the
median (min-max) of the single rounds; other figures are medians over rounds 2..N (or
repeats) with min-max. The machine limit is measured again after every federated run, and
each run's efficiency is against the mean of the measurements just before and after it:
on a shared machine the limit drifts by 20-56 % within minutes.
Timings are measured, never asserted.
"""

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

from benchmarks.machine_limit import samples_per_second
from fl_app.config import compose_config

REPO = Path(__file__).resolve().parents[1]

# (name, clients, fraction_fit, local_epochs, batch_size); fraction_evaluate = fraction_fit.
SETTINGS = [
    ("a", 10, 1.0, 1, 32),
    ("b", 100, 0.1, 5, 10),
]
# fl_app as configured: the server evaluating on the test set every 5 rounds and at the
# last, or every round, and the defaults (the server and the sampled clients evaluating
# every round). Every evaluation is inside the timed rounds.
FL_APP_VARIANTS = [
    ("server evaluating every 5 rounds", ("fraction_evaluate=0", "eval_every=5")),
    ("server evaluating every round", ("fraction_evaluate=0",)),
    ("server and clients evaluating every round (defaults)", ()),
]
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def summary(values: list[float], digits: int = 0) -> str:
    return (f"{statistics.median(values):,.{digits}f} "
            f"(min {min(values):,.{digits}f}, max {max(values):,.{digits}f})")


def tree_usage(proc: psutil.Process) -> tuple[float, float]:
    """Resident memory (GiB) of proc and all its descendants (Ray's processes and workers),
    and the CPU seconds used so far by the Ray workers that run the clients (Ray titles
    their processes `ray::ClientAppActor...`; workers that have exited are not counted)."""
    rss, workers_cpu = 0, 0.0
    for member in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            rss += member.memory_info().rss
            if "ClientAppActor" in " ".join(member.cmdline()):
                times = member.cpu_times()
                workers_cpu += times.user + times.system
    return rss / 2**30, workers_cpu


def workers_share(samples: list[tuple[float, float]], start: float, end: float) -> float:
    """Share of the machine's CPU time that the workers used between start and end
    (wall-clock timestamps), from (timestamp, workers' CPU seconds) samples.

    Measured in the same seconds as the run itself, so unlike the efficiency it does not
    move with the drift of the machine limit measured before and after the run.
    """
    def cpu_at(moment: float) -> float:
        after = next(k for k, (when, _) in enumerate(samples) if when >= moment)
        (t0, c0), (t1, c1) = samples[max(after - 1, 0)], samples[after]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (moment - t0) / (t1 - t0)

    return (cpu_at(end) - cpu_at(start)) / (psutil.cpu_count() * (end - start))


def run_tracked(cmd: list[str]) -> tuple[str, float, float, list[tuple[float, float]]]:
    """Run cmd; return its output, its start time, the peak RSS (GiB) of its process tree
    and (timestamp, workers' CPU seconds) every 0.5 s."""
    started = time.time()
    proc = psutil.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0.0
    cpu_samples = []
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.5):
            with contextlib.suppress(psutil.NoSuchProcess):  # the run has just ended
                rss, workers_cpu = tree_usage(proc)
                peak = max(peak, rss)
                cpu_samples.append((time.time(), workers_cpu))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-4000:]}")
    return output, started, peak, cpu_samples


def round_rates(starts: list[float], ends: list[float], samples: list[float]) -> dict:
    """Samples/s of rounds 2..N together ("throughput": all their samples over the wall time
    from the start of round 2 to the end of round N) and of each ("rates"; a round lasts
    from its start to the next round's start)."""
    bounds = starts[1:] + [ends[-1]]
    return {
        "throughput": sum(samples[1:]) / (ends[-1] - starts[1]),
        "rates": [samples[k] / (bounds[k] - starts[k]) for k in range(1, len(starts))],
    }


def fl_app_run(
    clients: int, fraction: float, epochs: int, batch: int, rounds: int, *overrides: str
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        _, launched, peak, cpu_samples = run_tracked([
            sys.executable, "run_simulation.py", f"num_clients={clients}",
            f"fraction_fit={fraction}", f"fraction_evaluate={fraction}",
            f"local_epochs={epochs}", f"batch_size={batch}", f"num_rounds={rounds}",
            f"hydra.run.dir={tmp}", *overrides,
        ])
        history = json.loads((Path(tmp) / "metrics.json").read_text())
        stamps = {"configure_fit": [], "[round ": []}
        for line in (Path(tmp) / "run_simulation.log").read_text().splitlines():
            match = LOG_TIME.match(line)
            for key, found in stamps.items():
                if match and f"- {key}" in line:
                    found.append(datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    samples = [r["train_examples"] * epochs for r in history]
    return {
        **round_rates(stamps["configure_fit"], stamps["[round "], samples),
        "startup": stamps["configure_fit"][0] - launched,
        "seconds_per_round": [b - a for a, b in zip(stamps["configure_fit"], stamps["[round "])][1:],
        "peak_gib": peak,
        # Rounds 2..N: from the start of round 2 to the end of the last round.
        "workers_share": workers_share(cpu_samples, stamps["configure_fit"][1], stamps["[round "][-1]),
    }


def plain_flower_run(clients: int, fraction: float, epochs: int, batch: int, rounds: int) -> dict:
    output, _, peak, _ = run_tracked([
        sys.executable, "-m", "benchmarks.plain_flower", f"--clients={clients}",
        f"--fraction-fit={fraction}", f"--epochs={epochs}", f"--batch-size={batch}",
        f"--rounds={rounds}",
    ])
    line = next(l for l in output.splitlines() if l.startswith("BENCH_RESULT "))
    timing = json.loads(line.removeprefix("BENCH_RESULT "))
    samples = [n * epochs for n in timing["train_examples"]]
    return {**round_rates(timing["round_starts"], timing["round_ends"], samples), "peak_gib": peak}


def throughput(run: dict) -> str:
    return f"{run['throughput']:,.0f} samples/s (rounds: {summary(run['rates'])})"


def machine_limit(batch: int, arrangement: tuple[int, int, int]) -> float:
    """Median samples/s of the machine limit's fastest arrangement, over 3 repeats."""
    return statistics.median(samples_per_second(batch, *arrangement, repeats=3).rates)


def limit_around(limits: list[float]) -> float:
    """The machine limit during a run: the mean of the two measured just before and after it."""
    return statistics.mean(limits[-2:])


def efficiency(rate: float, limits: list[float]) -> str:
    """A run's rate against the machine limit around it, and against each of the two
    measurements: that range says how far the limit drifted during the run."""
    before, after = limits[-2:]
    return (f"efficiency {rate / limit_around(limits):.2f} of the machine limit "
            f"({rate / max(before, after):.2f}-{rate / min(before, after):.2f} against the limit "
            f"measured before/after the run: {before:,.0f}/{after:,.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11,
                        help="rounds per run (round 1 is warm-up; 11 holds two of the every-5-rounds evaluations)")
    parser.add_argument("--skip-scale", action="store_true", help="skip the 1,000/10,000-client runs")
    parser.add_argument("--settings", nargs="+", choices=[s[0] for s in SETTINGS],
                        default=[s[0] for s in SETTINGS], help="the settings to run (default: all)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each fl_app configuration, taken in turn; with more than "
                             "one, their efficiencies are summarised per configuration")
    args = parser.parse_args()

    print(f"machine: {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    fastest = {}  # batch size -> the arrangement (processes, threads, steps) of the machine limit
    steps_per_execution = compose_config([]).steps_per_execution  # as fl_app trains
    settings = [s for s in SETTINGS if s[0] in args.settings]
    for batch in sorted({s[4] for s in settings}):
        cores = psutil.cpu_count()
        # The last arrangement is Keras' default of one batch per call, for reference.
        arrangements = ((cores, 1, steps_per_execution), (1, cores, steps_per_execution), (cores, 1, 1))
        medians = {}
        for arrangement in arrangements:
            rates = samples_per_second(batch, *arrangement).rates
            print(f"machine limit B={batch}: {arrangement[0]} process(es) x {arrangement[1]} thread(s), "
                  f"{arrangement[2]} step(s) per execution: {summary(rates)} samples/s")
            medians[arrangement] = statistics.median(rates)
        fastest[batch] = max(medians, key=medians.get)

    for name, clients, fraction, epochs, batch in settings:
        setting = (clients, fraction, epochs, batch, args.rounds)
        print(f"\nsetting ({name}): {clients} clients, fraction_fit={fraction}, E={epochs}, B={batch}")
        limits = [machine_limit(batch, fastest[batch])]  # measured again after every run
        plain = plain_flower_run(*setting)
        limits.append(machine_limit(batch, fastest[batch]))
        plain_rate = plain["throughput"]
        print(f"  plain Flower: {throughput(plain)}, {efficiency(plain_rate, limits)}, "
              f"peak memory {plain['peak_gib']:.2f} GiB")
        efficiencies = {label: [] for label, _ in FL_APP_VARIANTS}
        shares = {label: [] for label, _ in FL_APP_VARIANTS}
        for _ in range(args.repeats):
            for label, overrides in FL_APP_VARIANTS:
                ours = fl_app_run(*setting, *overrides)
                limits.append(machine_limit(batch, fastest[batch]))
                ours_rate = ours["throughput"]
                efficiencies[label].append(ours_rate / limit_around(limits))
                shares[label].append(ours["workers_share"])
                print(f"  fl_app, {label}: {throughput(ours)}, {efficiency(ours_rate, limits)}, "
                      f"{ours_rate / plain_rate:.2f}x plain Flower; "
                      f"workers used {ours['workers_share']:.2f} of the CPU time; "
                      f"start-up {ours['startup']:.1f} s, peak memory {ours['peak_gib']:.2f} GiB")
        if args.repeats > 1:
            for label, values in efficiencies.items():
                print(f"  fl_app, {label}: efficiency {summary(values, 2)}, workers used "
                      f"{summary(shares[label], 2)} of the CPU time, over {len(values)} runs")

    if not args.skip_scale:
        print()
        for clients in (100, 1_000, 10_000):
            run = fl_app_run(clients, 10 / clients, 1, 32, args.rounds)
            print(f"scale: {clients:,} clients, 10 per round: "
                  f"{statistics.median(run['seconds_per_round']):.2f} s/round "
                  f"(min {min(run['seconds_per_round']):.2f}, max {max(run['seconds_per_round']):.2f}), "
                  f"peak memory of the process tree {run['peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
