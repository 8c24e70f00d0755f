"""Benchmark: what a simulation costs as its population grows, at a fixed cohort.

Runs ``fedlora simulate`` with P clients (default 100, 1,000 and 10,000), the same
cohort per round (``--per-round``, default 10), the same client work (``--steps``
local steps of one batch) and the same data (``--examples`` synthetic examples in
all, default 20,000, so that what grows is the population alone; ``--per-client K``
gives each client K instead, so the data grows with the population, as a real one's does),
each in its own process, and prints for each population:

* seconds per round: the median ``wall_s`` of the rounds after the first (the first
  also starts every Ray worker and loads the model in it);
* the start: from the command to round 1's row (Ray, the partition table, the nodes);
* peak resident memory of the driver (the CLI process: server, Flower's engine and
  its per-node state) and of the whole process tree (with Ray and its workers),
  polled every 0.2 s.

The goal (issue: "beyond one machine"): the time per round independent of the
population, memory growing by at most a few MB per 1,000 idle clients.

    python experiments/bench_population.py [--populations 100 1000 10000] [--model tiny] [-- overrides]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def rss(process: psutil.Process) -> int:
    with contextlib.suppress(psutil.NoSuchProcess):
        return process.memory_info().rss
    return 0


def run(population: int, args: argparse.Namespace, out: Path) -> dict:
    overrides = [
        f"model={args.model}",
        f"clients={population}",
        f"clients_per_round={args.per_round}",
        f"rounds={args.rounds}",
        f"train.local_steps={args.steps}",
        "train.personal_eval=false",
        f"output_dir={out}",
        *args.overrides,
    ]
    if "data=" not in " ".join(args.overrides):
        examples = population * args.per_client if args.per_client else args.examples
        overrides += [f"data.synthetic_train={examples}", "data.synthetic_test=200"]
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "fedlora.cli", "simulate", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    peak = {"driver": 0, "tree": 0}
    first_row: list[float] = []

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            tree = [root, *root.children(recursive=True)]
            peak["driver"] = max(peak["driver"], rss(root))
            peak["tree"] = max(peak["tree"], sum(rss(p) for p in tree))
            if not first_row and (out / "metrics.csv").exists() and len(rows(out)) >= 2:
                first_row.append(time.monotonic() - started)
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    output, _ = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{population} clients failed ({proc.returncode}):\n{output[-3000:]}")
    walls = [float(r["wall_s"]) for r in rows(out)[2:]]  # rounds 2..R
    return {
        "population": population,
        "s_per_round": statistics.median(walls),
        "round_1_after_s": first_row[0] if first_row else float("nan"),
        "total_s": time.monotonic() - started,
        "driver_mb": peak["driver"] / 2**20,
        "tree_mb": peak["tree"] / 2**20,
    }


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--populations", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--examples", type=int, default=20000, help="synthetic training examples in all")
    parser.add_argument("--per-client", type=int, default=0, help="synthetic examples per client instead")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("overrides", nargs="*", help="extra fedlora overrides (after --)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for population in args.populations:
            result = run(population, args, Path(tmp) / f"p{population}")
            results.append(result)
            print(f"{population:>6} clients: {result['s_per_round']:.2f} s/round, round 1 after "
                  f"{result['round_1_after_s']:.0f} s, driver {result['driver_mb']:.0f} MB, "
                  f"tree {result['tree_mb']:.0f} MB", flush=True)  # fmt: skip
    base = results[0]
    data = f"{args.per_client} examples per client" if args.per_client else f"{args.examples:,} examples in all"
    print(f"\nmodel={args.model}, {data}, {args.per_round} clients per round, {args.steps} local steps, "
          f"{args.rounds} rounds (s/round: median of rounds 2-{args.rounds})")  # fmt: skip
    print("| clients | s per round | x | round 1 after (s) | driver peak MB | x | tree peak MB | x |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['population']:,} | {r['s_per_round']:.2f} | {r['s_per_round'] / base['s_per_round']:.2f} | "
              f"{r['round_1_after_s']:.0f} | {r['driver_mb']:.0f} | {r['driver_mb'] / base['driver_mb']:.2f} | "
              f"{r['tree_mb']:.0f} | {r['tree_mb'] / base['tree_mb']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
