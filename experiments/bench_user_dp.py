"""User-level DP-FedAvg at cross-device scale: 1,000 clients on SST-2, 50 expected per round.

    python experiments/bench_user_dp.py [--out experiments/results/user_dp] [--rounds 20]
        [--strategy fed_sb] [--epsilons 8 inf] [--memory-rounds 2] [-- <overrides>]

Each run is a ``fedlora simulate`` subprocess (MiniLM, SST-2 from ../shared/data/sst2,
67,349 training sentences over 1,000 clients, about 67 each, IID; the 872 dev sentences
as the test set; 5 local steps of 16), one per epsilon (``inf``: no DP), delta 1e-5;
then a memory check: the same cohort (50 expected) from 100 clients against 1,000, for
``--memory-rounds`` rounds each. It prints, per run: accuracy by round, final and best,
epsilon per round, the clip-norm trajectory, wall time, and the peak resident memory of
the whole process tree (the CLI, Ray and its workers, polled every 0.5 s).

Fed-SB (the default here) trains r x r = 64 numbers per adapted weight: under
user-level DP the noise norm grows with the square root of what is averaged, so it
suits DP-FedAvg best. Its LoRA-SB initialisation needs a public calibration file
under ``privacy=user``: the benchmark writes one from the first 256 training sentences
and treats them as public (a stand-in for a public sentiment corpus).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
BASE = [
    "model=minilm", "data=sst2", f"data.path={SST2}", "partition=iid", "clients=1000", "clients_per_round=50",
    "train.local_steps=5", "train.batch_size=16", "server.round_timeout=3600",
]  # fmt: skip


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants now (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def run(name: str, overrides: list[str], out: Path) -> dict:
    """One simulation; its metrics rows, wall time and peak tree RSS."""
    folder = out / name
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--overwrite", *overrides, f"output_dir={folder}"]
    folder.mkdir(parents=True, exist_ok=True)
    peak = [0]
    started = time.perf_counter()
    with (out / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.5)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        code = proc.wait()
        done.set()
        watcher.join()
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {out / f'{name}.log'}")
    with (folder / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {"name": name, "rows": rows, "wall_min": wall / 60, "peak_mb": peak[0] / 2**20}


def public_file(out: Path, n: int = 256) -> Path:
    """The first ``n`` SST-2 training sentences as the 'public' LoRA-SB calibration file (same format)."""
    path = out / "public_calibration.tsv"
    lines = (SST2 / "train.tsv").read_text().splitlines()
    path.write_text("\n".join(lines[: n + 1]) + "\n")
    return path


def describe(result: dict) -> str:
    rows = result["rows"]
    acc = [float(r["test_accuracy"]) for r in rows if r["test_accuracy"]]
    line = [f"{result['name']}: final {acc[-1]:.3f}, best {max(acc):.3f}, {result['wall_min']:.1f} min, "
            f"peak RSS {result['peak_mb']:.0f} MB"]  # fmt: skip
    line.append("  accuracy by round: " + " ".join(f"{a:.3f}" for a in acc))
    if rows and rows[-1].get("epsilon"):
        line.append("  epsilon by round: " + " ".join(f"{float(r['epsilon']):.2f}" for r in rows[1:]))
        line.append("  clip by round: " + " ".join(f"{float(r['clip_norm']):.3g}" for r in rows[1:]))
    return "\n".join(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "user_dp")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--strategy", default="fed_sb")
    parser.add_argument("--epsilons", nargs="+", default=["8", "inf"])
    parser.add_argument(
        "--memory-rounds", type=int, default=2, help="rounds of the 100- vs 1,000-client check (0: skip)"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shared = [*BASE, f"strategy={args.strategy}", *args.overrides]
    if args.strategy == "fed_sb":
        shared.append(f"strategy.init_source={public_file(args.out)}")
    results = []
    for eps in args.epsilons:
        private = not math.isinf(float(eps))
        dp = ["privacy=user", f"privacy.epsilon={eps}", "privacy.delta=1e-5"] if private else []
        results.append(run(f"eps-{eps}", [*shared, f"rounds={args.rounds}", *dp], args.out))
        print(describe(results[-1]), flush=True)
    if args.memory_rounds:
        for clients in (100, 1000):
            over = [*shared, f"rounds={args.memory_rounds}", f"clients={clients}", "privacy=user", "privacy.epsilon=8"]
            result = run(f"memory-{clients}", over, args.out)
            print(f"memory, {clients} clients, 50 expected per round, {args.memory_rounds} rounds: peak RSS "
                  f"{result['peak_mb']:.0f} MB, {result['wall_min']:.1f} min", flush=True)  # fmt: skip
            results.append(result)
        small, large = results[-2]["peak_mb"], results[-1]["peak_mb"]
        print(f"peak RSS 1,000 / 100 clients: {large / small:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
