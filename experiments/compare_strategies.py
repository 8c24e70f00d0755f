"""Run several strategies on the same federation and print a Markdown table.

Each strategy runs as ``fedlora simulate`` (one after the other, so wall times are
comparable) with the same overrides; the table gives the central test accuracy
after the last round, the best round, the upload and download per round (bytes as
sent, from metrics.csv; round 0 is the one-off gradient upload of Fed-SB's
LoRA-SB initialisation) and the wall time.

    python experiments/compare_strategies.py --strategies fedavg ffa_lora fedsvd fed_sb -- \\
        model=minilm data=ag_news data.path=../shared/data/ag_news partition=dirichlet \\
        partition.alpha=0.5 clients=20 clients_per_round=5 rounds=10
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from fedlora.console import human_bytes as human
from fedlora.metrics import METRICS, read_metrics

RESULTS = Path(__file__).resolve().parent / "results" / "compare_strategies"


def run(strategy: str, overrides: list[str], out: Path) -> float:
    started = time.perf_counter()
    cmd = ["fedlora", "simulate", f"strategy={strategy}", f"output_dir={out}", *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - started


def row(strategy: str, out: Path, wall_s: float) -> str:
    rows = read_metrics(out / METRICS)
    rounds = [r for r in rows if int(r["round"]) > 0]
    accs = [(float(r["test_accuracy"]), int(r["round"])) for r in rounds if r["test_accuracy"]]
    init_up = float(rows[0]["bytes_up"] or 0)
    up = sum(float(r["bytes_up"]) for r in rounds) / len(rounds)
    down = sum(float(r["bytes_down"]) for r in rounds) / len(rounds)
    per_client = float(rounds[-1]["bytes_up"]) / max(1, int(rounds[-1]["replies_received"]))
    best, best_round = max(accs)
    return (
        f"| {strategy} | {accs[-1][0]:.3f} | {best:.3f} (r{best_round}) | {human(per_client)} | {human(up)} | "
        f"{human(down)} | {human(init_up) if init_up else '-'} | {wall_s / 60:.1f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "ffa_lora", "fedsvd", "fed_sb"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every run")
    args = parser.parse_args()
    lines = [
        "| strategy | final acc | best acc | up per client | up per round | down per round | round-0 up | wall min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for strategy in args.strategies:
        out = args.out / strategy
        wall_s = run(strategy, args.overrides, out)
        lines.append(row(strategy, out, wall_s))
        print("\n".join(lines), flush=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"table: {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
