"""Run several configurations on the same federation, and the centralised reference, and print a Markdown table.

Each variant is ``fedlora simulate`` with the shared overrides plus its own (one after
the other, so wall times are comparable); ``--centralised`` adds ``fedlora centralised``
on the same overrides (plain LoRA on the pooled data, as many optimizer steps). A
finished variant (its adapter written) is not run again, so the script can be resumed.
The table gives the central test accuracy after the last round, the best round, the
first round at or above ``--target``, the lowest of the last five rounds (a collapse
shows there), the upload and download per round (bytes as sent, from metrics.csv;
round 0 is Fed-SB's one-off gradient upload) and the wall time.

    python experiments/compare_strategies.py --strategies fedavg ffa_lora fedsvd fed_sb --centralised -- \\
        model=minilm data=ag_news data.path=../shared/data/ag_news partition=dirichlet \\
        partition.alpha=0.5 clients=20 clients_per_round=5 rounds=20
    # variants with their own overrides: "label=override,override"
    python experiments/compare_strategies.py --variants "fedavgm=strategy=fedavg,server.optimizer=momentum" -- ...
    # seeds: each run once per seed; the table gives mean ± 95% t interval (n) and each variant against the
    # first on paired seeds: the final round and, for runs of 10 rounds or more, the mean of the last 5
    python experiments/compare_strategies.py --seeds 0 1 2 --strategies fedavg fed_sb -- ...

For the published tables use ``fedlora bench`` (results files in docs/results/, tables generated).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from fedlora.outputs.console import human_bytes as human
from fedlora.outputs.metrics import read_metrics
from fedlora.outputs.run_folder import METRICS
from fedlora.outputs.stats import TAIL, paired_difference, t_interval, tail_mean, verdict

RESULTS = Path(__file__).resolve().parent / "results" / "compare_strategies"
SEEDED_HEADER = (
    "| run | final acc | best acc | lowest of the last 5 | up per round | down per round | n | wall min |\n"
    "|---|---|---|---|---|---|---|---|"
)
HEADER = (
    "| run | final acc | best acc | first round >= {target} | lowest of the last 5 | up per round | down per round "
    "| round-0 up | wall min |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def run(command: str, overrides: list[str], out: Path) -> float:
    """One fedlora command into ``out``; its wall time (0 when it had finished before)."""
    if (out / "adapter").is_dir() and (out / METRICS).is_file():
        return float((out / "wall_s").read_text()) if (out / "wall_s").is_file() else 0.0
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "fedlora.cli", command, "--overwrite", *overrides, f"output_dir={out}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - started
    (out / "wall_s").write_text(f"{wall:.1f}")
    return wall


def measures(out: Path, target: float) -> dict[str, float]:
    """One run's numbers: final, best, first round at ``target`` (nan: never), lowest of the last 5, the mean
    of the last 5 (None under 10 rounds), bytes."""
    rows = read_metrics(out / METRICS)
    rounds = [r for r in rows if int(r["round"]) > 0]
    accs = [float(r["test_accuracy"]) for r in rounds if r["test_accuracy"]]
    reached = next((i + 1 for i, acc in enumerate(accs) if acc >= target), float("nan"))
    return {
        "final": accs[-1], "best": max(accs), "reached": reached, "low5": min(accs[-5:]),
        "tail": tail_mean(accs),
        "up": sum(float(r["bytes_up"] or 0) for r in rounds) / len(rounds),
        "down": sum(float(r["bytes_down"] or 0) for r in rounds) / len(rounds),
    }  # fmt: skip


def seeded_row(label: str, runs: list[dict[str, float]], walls: list[float]) -> str:
    """A variant over its seeds (each run's :func:`measures`): each accuracy as mean ± 95% t half-width, and n."""

    def cell(key: str) -> str:
        return t_interval([r[key] for r in runs]).format().rsplit(" (n=", 1)[0]

    up, down = (human(runs[0][k]) if runs[0][k] else "-" for k in ("up", "down"))
    return (
        f"| {label} | {cell('final')} | {cell('best')} | {cell('low5')} | {up} | {down} | {len(runs)} "
        f"| {sum(walls) / 60:.1f} |"
    )


def row(label: str, out: Path, wall_s: float, target: float) -> str:
    rows = read_metrics(out / METRICS)
    rounds = [r for r in rows if int(r["round"]) > 0]
    accs = [(float(r["test_accuracy"]), int(r["round"])) for r in rounds if r["test_accuracy"]]
    init_up = float(rows[0]["bytes_up"] or 0)
    up = sum(float(r["bytes_up"] or 0) for r in rounds) / len(rounds)
    down = sum(float(r["bytes_down"] or 0) for r in rounds) / len(rounds)
    best, best_round = max(accs)
    reached = next((rnd for acc, rnd in accs if acc >= target), None)
    return (
        f"| {label} | {accs[-1][0]:.3f} | {best:.3f} (r{best_round}) | {reached or '-'} | "
        f"{min(acc for acc, _ in accs[-5:]):.3f} | "
        f"{human(up) if up else '-'} | {human(down) if down else '-'} | {human(init_up) if init_up else '-'} | "
        f"{wall_s / 60:.1f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="*", default=[], help="variants strategy=<name>, nothing else")
    parser.add_argument("--variants", nargs="*", default=[], help='"label=override,override"')
    parser.add_argument("--centralised", action="store_true", help="add the centralised reference")
    parser.add_argument("--target", type=float, default=0.85, help="report the first round at this accuracy")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seeds", nargs="*", type=int, default=None, help="run each variant once per seed")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every run")
    args = parser.parse_args()
    variants = [(s, [f"strategy={s}"]) for s in args.strategies]
    for spec in args.variants:
        label, _, extra = spec.partition("=")
        variants.append((label, [o for o in extra.split(",") if o]))
    runs = [("centralised", "centralised", [])] if args.centralised else []
    runs += [(label, "simulate", extra) for label, extra in variants]
    if args.seeds:
        return over_seeds(runs, args)
    lines = [HEADER.format(target=args.target)]
    for label, command, extra in runs:
        out = args.out / label.replace("/", "_")
        wall_s = run(command, [*args.overrides, *extra], out)
        lines.append(row(label, out, wall_s, args.target))
        print("\n".join(lines), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"table: {args.out / 'table.md'}")
    return 0


def over_seeds(runs: list[tuple[str, str, list[str]]], args: argparse.Namespace) -> int:
    """Every run once per seed (``seed=<s>`` last), a row per variant over its seeds, each against the first."""
    lines = [SEEDED_HEADER]
    measured: dict[str, dict[int, dict[str, float]]] = {}
    for label, command, extra in runs:
        outs, walls = [], []
        for seed in args.seeds:
            out = args.out / label.replace("/", "_") / f"seed-{seed}"
            walls.append(run(command, [*args.overrides, *extra, f"seed={seed}"], out))
            outs.append(out)
        measured[label] = {seed: measures(out, args.target) for seed, out in zip(args.seeds, outs, strict=True)}
        lines.append(seeded_row(label, list(measured[label].values()), walls))
        print("\n".join(lines), flush=True)
    first = next(label for label, command, _ in runs if command == "simulate")
    verdicts = against(measured, first)
    lines += ["", *verdicts]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(verdicts) + f"\ntable: {args.out / 'table.md'}")
    return 0


def against(measured: dict[str, dict[int, dict[str, float]]], first: str) -> list[str]:
    """Each variant (not the centralised reference) against ``first`` on paired seeds: the final round, and
    the mean of the last rounds where both ran long enough (a non-IID run's final round moves with its cohort)."""
    out = []
    for label, by_seed in measured.items():
        if label in (first, "centralised"):
            continue
        for key, what in (("final", ""), ("tail", f"(mean of the last {TAIL} rounds)")):
            mine = {s: m[key] for s, m in by_seed.items() if m[key] is not None}
            theirs = {s: m[key] for s, m in measured[first].items() if m[key] is not None}
            if key == "final" or set(mine) & set(theirs):
                out.append(f"- {verdict(label, first, paired_difference(mine, theirs), what=what)}")
    return out


if __name__ == "__main__":
    sys.exit(main())
