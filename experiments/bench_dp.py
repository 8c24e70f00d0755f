"""Time and peak memory of a DP-SGD local round over a plain one, per Opacus grad-sample mode.

    python experiments/bench_dp.py [--rounds 3] [-- <overrides>]

One client round (10 steps of 16 examples, MiniLM with LoRA r = 8 on query and
value, head trained) on the same batches in every mode: the Poisson masks and noise
are seeded (``privacy.unsafe_seeded_randomness=true``, NOT PRIVATE: a benchmark only)
so that every mode does the same work, with fixed noise (sigma 1).
Each mode runs in its own process, builds the worker, runs one warm-up round and
then ``--rounds`` timed ones. Peak memory is the process's peak resident set during
the timed rounds minus its resident set before them (CPU: what the round adds).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "hooks", "functorch", "ghost")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news"
DEFAULT = ["model=minilm", "clients=20", "train.local_steps=10", "train.batch_size=16"]
DEFAULT += ["data=ag_news", f"data.path={SHARED}"] if SHARED.is_dir() else []


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(mode: str, rounds: int, overrides: list[str]) -> dict:
    from fedlora.config.compose import compose
    from fedlora.learning.worker import Worker

    dp = (
        []
        if mode == "plain"
        else [
            "privacy=dp",
            "privacy.noise_multiplier=1.0",
            "privacy.unsafe_seeded_randomness=true",
            f"privacy.grad_sample_mode={mode}",
        ]
    )
    cfg, _ = compose([*DEFAULT, *overrides, *dp])
    worker = Worker(cfg, num_partitions=cfg.clients)
    start = worker.adapted.protocol.download(worker.adapted.initial_state())
    history = [] if cfg.privacy.enabled else None
    worker.train_round(0, start, server_round=0, history=history)  # warm-up: builds, tokenises, first-call costs
    before = rss_mb()
    times = []
    for r in range(1, rounds + 1):
        t = time.perf_counter()
        worker.train_round(0, start, server_round=r, history=history)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "seconds": statistics.median(times), "peak_mb": max(0.0, peak - before)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.rounds, args.overrides)))
        return 0
    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--one", mode, "--rounds", str(args.rounds), *args.overrides]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{mode}: {results[mode]['seconds']:.2f} s per round, +{results[mode]['peak_mb']:.0f} MB", flush=True)
    plain = results["plain"]
    print("\n| mode | s per round | x plain | peak MB added | x plain |\n|---|---|---|---|---|")
    for mode, r in results.items():
        mem_ratio = r["peak_mb"] / plain["peak_mb"] if plain["peak_mb"] > 0 else float("nan")
        ratio = r["seconds"] / plain["seconds"]
        print(f"| {mode} | {r['seconds']:.2f} | {ratio:.2f} | {r['peak_mb']:.0f} | {mem_ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
