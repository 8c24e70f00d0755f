"""Benchmark: what secure aggregation (Flower's SecAgg+) costs per round, against the same run in the clear.

For each strategy (default FedAvg and Fed-SB) and cohort size n (default 5, 10, 20; every client
trains every round), runs ``fedlora simulate`` twice, without and with
``server.secure_aggregation=secaggplus``, each in its own process, on MiniLM and SST-2
(``--data``, default ../shared/data/sst2; Fed-SB initialises from a calibration file there, as
secure aggregation requires: ``--calibration``), and prints per round:

* bytes up and down (metrics.csv: every stage's messages under SecAgg+: public keys, encrypted
  shares, int64 masked vectors, unmasking shares; the training message and its update otherwise);
* seconds per round: the median ``wall_s`` of the rounds after the first (the first also starts
  Ray's workers and loads the model in each);
* the accuracy after the last round, to see the two runs train alike (both take the plain weighted
  mean: the run in the clear without Multi-Krum and the update clip, which SecAgg+ cannot apply).

    python experiments/bench_secagg.py [--cohorts 5 10 20] [--strategies fedavg fed_sb] [-- overrides]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(strategy: str, cohort: int, secure: bool, args: argparse.Namespace, out: Path) -> dict:
    overrides = [
        "model=minilm", "data=sst2", f"data.path={args.data}", f"strategy={strategy}",
        f"clients={cohort}", f"clients_per_round={cohort}", f"rounds={args.rounds}",
        f"train.local_steps={args.steps}", "train.personal_eval=false", f"output_dir={out}",
        "server.multi_krum=0", "server.update_clip=null",  # both runs take the plain mean (SecAgg+ can only)
        *(["server.secure_aggregation=secaggplus"] if secure else []),
        *([f"strategy.init_source={args.calibration}"] if strategy == "fed_sb" else []),
        *args.overrides,
    ]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "fedlora.cli", "simulate", *overrides], cwd=ROOT,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{strategy} n={cohort} secure={secure} failed:\n{done.stderr[-3000:]}")
    with (out / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["round"]) >= 1]
    return {
        "up": statistics.median(int(r["bytes_up"]) for r in rows),
        "down": statistics.median(int(r["bytes_down"]) for r in rows),
        "wall": statistics.median(float(r["wall_s"]) for r in rows[1:] or rows),
        "acc": float(rows[-1]["test_accuracy"]),
    }


def kb(n: float) -> str:
    return f"{n / 1024:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohorts", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "fed_sb"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--calibration", default=None, help="Fed-SB's calibration file (default: <data>/train.tsv)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.calibration = args.calibration or str(Path(args.data) / "train.tsv")
    print("| strategy | clients | up KB/round (plain -> SecAgg+) | down KB/round | s/round | accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies:
            for cohort in args.cohorts:
                plain, secure = (run(strategy, cohort, s, args, Path(tmp) / f"{strategy}-{cohort}-{s}") for s in (0, 1))
                ratio = secure["up"] / plain["up"]
                print(
                    f"| {strategy} | {cohort} | {kb(plain['up'])} -> {kb(secure['up'])} ({ratio:.1f}x) "
                    f"| {kb(plain['down'])} -> {kb(secure['down'])} | {plain['wall']:.2f} -> {secure['wall']:.2f} "
                    f"| {plain['acc']:.4f} / {secure['acc']:.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
