"""Benchmark: SmolLM2-135M-Instruct fine-tuned federatedly on AG News as instruction following.

Each test text becomes a prompt asking for one of the label words (world, sports,
business, tech) in the model's chat template; the answer is the label word. It prints:

1. **one client's cost**, measured in a fresh process with one torch thread (what a
   simulated client gets with ``simulation.num_cpus=1``): seconds per local step
   (median over rounds after a warm-up round) and the process's peak resident memory
   (model, optimizer, activations, tokenised partition);
2. **the federated runs**, one ``fedlora simulate`` per strategy on the same federation
   (10 clients, Dirichlet 0.5, 5 per round): the zero-shot accuracy (round 0, before any
   training), the accuracy after the last round by ranking the label words'
   log-likelihoods on the full test set, greedy-generation accuracy on the first 64 test
   texts, bytes up and down per round and the wall time.

A finished run (its adapter written) is not run again, so the script can be resumed.

    python experiments/bench_causal_lm.py --strategies fedavg fedsvd
    # what passed 0.85 (docs/results.md): lr 5e-3, cosine over 10 rounds, about 36 min a run
    python experiments/bench_causal_lm.py --measure-rounds 0 --strategies \
        --variants "cos10=strategy=fedavg,train.lr=0.005,train.lr_schedule=cosine,rounds=10,train.eval_every=10"
    python experiments/bench_causal_lm.py --strategies fedavg --variants "fedavg-lr1e-3=strategy=fedavg,train.lr=0.001"
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_strategies import run  # the same resumable runner as the encoder comparison

from fedlora.outputs.console import human_bytes as human
from fedlora.outputs.metrics import read_metrics
from fedlora.outputs.run_folder import METRICS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "ag_news"
RESULTS = Path(__file__).resolve().parent / "results" / "causal_lm"
FEDERATION = [
    "model=smollm2",
    "data=ag_news",
    f"data.path={SHARED}",
    "partition=dirichlet",
    "partition.alpha=0.5",
    "clients=10",
    "clients_per_round=5",
    "rounds=5",
    "train.local_steps=10",
    "train.batch_size=8",
    "train.max_seq_len=128",  # median prompt 108 tokens, 90% within 130 (the start of longer texts is cut)
    "train.eval_every=5",  # round 0 (zero-shot) and the last: an evaluation of the 1,000 test texts is minutes
    "train.eval_batch_size=32",
]
HEADER = (
    "| run | zero-shot acc | final acc (ranking, 1,000) | generation acc (64) | test loss | up per round "
    "| down per round | wall min |\n|---|---|---|---|---|---|---|---|"
)


def measure(overrides: list[str], rounds: int) -> dict[str, float]:
    """One client's seconds per local step and peak RSS, in this (fresh) process with one thread."""
    import torch

    from fedlora.config.compose import compose
    from fedlora.learning.worker import Worker

    torch.set_num_threads(1)
    cfg, _ = compose(overrides)
    worker = Worker(cfg, num_partitions=cfg.clients)
    start = worker.adapted.protocol.download(worker.adapted.initial_state())
    worker.train_round(0, start, server_round=1)  # warm-up: loads the model, tokenises, first-call costs
    times = []
    for r in range(2, rounds + 2):
        t = time.perf_counter()
        worker.train_round(0, start, server_round=r)
        times.append(time.perf_counter() - t)
    steps = cfg.train.local_steps or 1
    return {
        "seconds_per_step": statistics.median(times) / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batch_size": cfg.train.batch_size,
        "trainable": sum(v.numel() for v in start.values()),
    }


def row(label: str, out: Path, wall_s: float) -> str:
    rows = read_metrics(out / METRICS)
    evaluated = [r for r in rows if r["test_accuracy"]]
    zero, last = evaluated[0], evaluated[-1]
    trained = [r for r in rows if int(r["round"]) > 0]
    up = sum(float(r["bytes_up"] or 0) for r in trained) / len(trained)
    down = sum(float(r["bytes_down"] or 0) for r in trained) / len(trained)
    gen = last.get("test_generation_accuracy") or ""
    cells = [
        label,
        f"{float(zero['test_accuracy']):.3f}",
        f"{float(last['test_accuracy']):.3f} (r{last['round']})",
        f"{float(gen):.3f}" if gen else "-",
        f"{float(last['test_loss']):.3f}",
        human(up),
        human(down),
        f"{wall_s / 60:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="*", default=["fedavg", "fedsvd"])
    parser.add_argument("--variants", nargs="*", default=[], help='"label=override,override"')
    parser.add_argument("--measure-rounds", type=int, default=1, help="timed client rounds (0: skip the measurement)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after the benchmark's own")
    args = parser.parse_args()
    overrides = [*FEDERATION, *args.overrides]
    if args.measure:
        print(json.dumps(measure(overrides, args.measure_rounds)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    cost = args.out / "client_cost.json"
    if args.measure_rounds and not cost.is_file():
        child = [sys.executable, __file__, "--measure", f"--measure-rounds={args.measure_rounds}", *args.overrides]
        done = subprocess.run(child, check=True, capture_output=True, text=True)
        cost.write_text(done.stdout.strip().splitlines()[-1])
    if cost.is_file():
        c = json.loads(cost.read_text())
        print(
            f"one client (1 thread, batch {c['batch_size']}, {c['trainable']:,} numbers in the adapter state): "
            f"{c['seconds_per_step']:.2f} s per local step, peak RSS {c['peak_rss_mb']:.0f} MiB",
            flush=True,
        )
    variants = [(s, [f"strategy={s}"]) for s in args.strategies]
    for spec in args.variants:
        label, _, extra = spec.partition("=")
        variants.append((label, [o for o in extra.split(",") if o]))
    lines = [HEADER]
    for label, extra in variants:
        out = args.out / label
        wall_s = run("simulate", [*overrides, *extra], out)
        lines.append(row(label, out, wall_s))
        print("\n".join(lines), flush=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"table: {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
