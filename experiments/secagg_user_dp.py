"""User-level DP with and without secure aggregation, over seeds: the same accountant, accuracy within noise.

For each seed (default 0, 1, 2), runs the cross-device user-level DP setting of
``experiments/bench_user_dp.py`` (MiniLM, SST-2 over 1,000 clients, 50 expected per round,
Fed-SB from a public calibration file, epsilon 8 at delta 1e-5, private randomness) twice,
without and with ``server.secure_aggregation=secaggplus``, and prints each run's final
accuracy and epsilon, both means with their 95% t intervals, and the paired difference.
Under SecAgg+ the clients clip and the server noises the unmasked sum: the mechanism and its
accounting are the same, so epsilon must be equal and accuracy within the noise's spread.

    python experiments/secagg_user_dp.py [--seeds 0 1 2] [--rounds 5] [-- overrides]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_user_dp import BASE, public_file  # this folder is on the path when run as a script

from fedlora.outputs.stats import paired_difference, t_interval, verdict

ROOT = Path(__file__).resolve().parents[1]


def final(out: Path, overrides: list[str]) -> tuple[float, float]:
    """(accuracy, epsilon) after the last round of one ``fedlora simulate``."""
    argv = [sys.executable, "-m", "fedlora.cli", "simulate", *overrides, f"output_dir={out}"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    with (out / "metrics.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    return float(last["test_accuracy"]), float(last["epsilon"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    accuracy: dict[str, dict[int, float]] = {"plain": {}, "secaggplus": {}}
    with tempfile.TemporaryDirectory() as tmp:
        calibration = public_file(Path(tmp))
        shared = [*BASE, "strategy=fed_sb", f"strategy.init_source={calibration}", "privacy=user",
                  f"privacy.epsilon={args.epsilon}", "privacy.delta=1e-5", f"rounds={args.rounds}",
                  *args.overrides]  # fmt: skip
        for seed in args.seeds:
            for mode in accuracy:
                secure = ["server.secure_aggregation=secaggplus"] if mode == "secaggplus" else []
                acc, eps = final(Path(tmp) / f"{mode}-{seed}", [*shared, f"seed={seed}", *secure])
                accuracy[mode][seed] = acc
                print(f"seed {seed} {mode}: accuracy {acc:.4f}, epsilon {eps:.3f}", flush=True)
    for mode, by_seed in accuracy.items():
        print(f"{mode}: {t_interval(list(by_seed.values())).format(4)}")
    diff = paired_difference(accuracy["secaggplus"], accuracy["plain"])
    print(verdict("secaggplus", "plain", diff, what=f"at user-level epsilon {args.epsilon:g}"))


if __name__ == "__main__":
    main()
