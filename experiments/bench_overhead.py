"""Benchmark: what does Flower's simulation engine cost over the same training in a plain loop?

Runs R rounds of C client rounds (MiniLM, LoRA, S local steps each) twice:

* simulation: ``fedlora``'s ServerApp/ClientApp on Flower's simulation engine with Ray,
  one actor per ``simulation.num_cpus`` cores (so all cores train clients in parallel);
* plain loop: the same client rounds (same partitions, seeds, batches and FedAvg) called
  directly on a :class:`fedlora.worker.Worker` in this process, torch using all cores.

Prints per-round wall times and the ratio simulation / plain loop, for the steady state
(rounds after the first, which in both cases also loads the model and tokenises data)
and in total (the simulation's total includes starting Ray). Central evaluation is off
in both so that only training and aggregation are timed.

    python experiments/bench_overhead.py --rounds 3 --clients-per-round 10 --steps 20
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per client actor")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="fraction of a GPU per client actor")
    parser.add_argument("--data", default=str(SHARED) if SHARED.exists() else "", help="AG News folder")
    parser.add_argument("overrides", nargs="*", help="extra fedlora overrides")
    args = parser.parse_args()

    from fedlora.checkpoint import METRICS, read_metrics
    from fedlora.cli import compose, run_flower_simulation, setup_logging
    from fedlora.worker import Worker

    setup_logging(verbose=False)
    logging.getLogger("fedlora").setLevel(logging.WARNING)
    cores = os.cpu_count() or 1
    data = ["data=ag_news", f"data.path={args.data}"] if args.data else []
    overrides = [
        *data,
        f"clients={args.clients_per_round}",
        f"clients_per_round={args.clients_per_round}",
        f"rounds={args.rounds}",
        f"train.local_steps={args.steps}",
        "train.eval_every=0",
        f"simulation.num_cpus={args.num_cpus}",
        f"simulation.num_gpus={args.num_gpus}",
        *args.overrides,
    ]

    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = compose([*overrides, f"output_dir={tmp}"])
        print(
            f"{cores} cores; {args.rounds} rounds x {args.clients_per_round} clients x {args.steps} steps; "
            f"model={cfg.model.name} data={cfg.data.name} batch={cfg.train.batch_size} max_len={cfg.train.max_seq_len}"
        )
        started = time.perf_counter()
        run_flower_simulation(cfg, verbose=False)
        sim_total = time.perf_counter() - started
        sim_rounds = [float(r["wall_s"]) for r in read_metrics(Path(tmp) / METRICS)[1:]]

    import torch

    torch.set_num_threads(cores)
    worker = Worker(cfg, num_partitions=cfg.clients)
    started = time.perf_counter()
    state = worker.strategy.initial_state(worker.initial_adapters(), generator=torch.Generator().manual_seed(0))
    plain_rounds = []
    for server_round in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        received = worker.sent_down(state)
        replies = [worker.train_round(pid, received, server_round=server_round) for pid in range(cfg.clients)]
        p = worker.strategy.weights([n for _, n, _ in replies])
        state = worker.strategy.aggregate(state, [payload for payload, _, _ in replies], p)
        plain_rounds.append(time.perf_counter() - t0)
    plain_total = time.perf_counter() - started

    print("round   simulation_s   plain_loop_s")
    for i, (s, p) in enumerate(zip(sim_rounds, plain_rounds, strict=True), start=1):
        print(f"{i:>5}   {s:>12.2f}   {p:>12.2f}")
    if len(sim_rounds) > 1:
        steady = statistics.mean(sim_rounds[1:]) / statistics.mean(plain_rounds[1:])
        print(f"steady-state ratio (rounds 2..{cfg.rounds}) simulation / plain loop: {steady:.3f}")
    print(
        f"total ratio (incl. Ray start, model load, tokenising): {sim_total:.1f} s / {plain_total:.1f} s "
        f"= {sim_total / plain_total:.3f}"
    )
    n = cfg.rounds * cfg.clients
    print(
        f"client rounds: {n}; per client round: "
        f"simulation {sum(sim_rounds) / n:.2f} s, plain {sum(plain_rounds) / n:.2f} s"
    )


if __name__ == "__main__":
    main()
