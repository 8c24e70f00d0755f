"""Benchmark: what does Flower's simulation engine cost over the same training in a plain loop?

Runs R rounds of C client rounds (MiniLM, LoRA, S local steps each) twice:

* simulation: ``fedlora``'s ServerApp/ClientApp on Flower's simulation engine with Ray,
  one actor per ``simulation.num_cpus`` cores (so all cores train clients in parallel);
* plain loop: the same client rounds (same partitions, seeds, batches and FedAvg) called
  directly on :class:`fedlora.learning.worker.Worker` objects, with no Flower and no Ray, in one of
  two shapes (``--plain``): ``threads``, one process with torch using every core (what a
  person would write first), or ``processes``, a pool with one single-thread process per
  client slot, the same parallel shape as the simulation, so that the ratio isolates what
  Flower and Ray cost.

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedlora.config.run import RunConfig
    from fedlora.learning.worker import Worker
    from fedlora.lora import Tensors

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per client actor")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="fraction of a GPU per client actor")
    parser.add_argument("--data", default=str(SHARED) if SHARED.exists() else "", help="AG News folder")
    parser.add_argument("--plain", choices=("threads", "processes", "both"), default="both")
    parser.add_argument("overrides", nargs="*", help="extra fedlora overrides")
    args = parser.parse_args()

    from fedlora.config.compose import compose
    from fedlora.flower.simulation import run_flower_simulation
    from fedlora.outputs.console import setup_logging
    from fedlora.outputs.metrics import read_metrics
    from fedlora.outputs.run_folder import METRICS

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

    slots = max(1, int(cores // args.num_cpus))
    shapes = ("threads", "processes") if args.plain == "both" else (args.plain,)
    for shape in shapes:
        plain_rounds, plain_total = plain_loop(cfg, parallel=slots if shape == "processes" else 0, cores=cores)
        label = f"plain loop, {shape}" + (f" ({slots} x 1 thread)" if shape == "processes" else f" (1 x {cores})")
        report(label, cfg, sim_rounds, sim_total, plain_rounds, plain_total)


def plain_loop(cfg: RunConfig, *, parallel: int, cores: int) -> tuple[list[float], float]:
    """The simulation's client rounds without Flower: in this process, or in ``parallel`` processes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from fedlora.federation.server_step import server_step
    from fedlora.learning.worker import Worker

    torch.set_num_threads(cores)
    worker = Worker(cfg, num_partitions=cfg.clients)
    pool = None
    if parallel:
        pool = ProcessPoolExecutor(
            parallel, mp_context=mp.get_context("spawn"), initializer=_init_process, initargs=(cfg,)
        )
        list(pool.map(_noop, range(parallel)))  # start the processes before timing, as Ray's actors are
    started = time.perf_counter()
    state = worker.adapted.initial_state()
    times = []
    for server_round in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        received = worker.adapted.protocol.download(state)
        jobs = [(pid, received, server_round) for pid in range(cfg.clients)]
        replies = list(pool.map(_train, jobs)) if pool else [_train(job, worker) for job in jobs]
        p = worker.strategy.weights([n for _, n in replies])
        state = server_step(
            worker.strategy, state, [payload for payload, _ in replies], p, server_round=server_round
        ).state
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - started
    if pool:
        pool.shutdown()
    return times, total


_PROCESS_WORKER = None


def _init_process(cfg: RunConfig) -> None:
    import torch

    from fedlora.learning.worker import Worker
    from fedlora.outputs.console import setup_logging

    global _PROCESS_WORKER
    setup_logging(verbose=False)
    torch.set_num_threads(1)
    _PROCESS_WORKER = Worker(cfg, num_partitions=cfg.clients)


def _noop(_: int) -> None:
    return None


def _train(job: tuple[int, Tensors, int], worker: Worker | None = None) -> tuple[Tensors, int]:
    pid, received, server_round = job
    payload, num_examples, _ = (worker or _PROCESS_WORKER).train_round(pid, received, server_round=server_round)
    return payload, num_examples


def report(
    label: str, cfg: RunConfig, sim_rounds: list[float], sim_total: float, plain_rounds: list[float], plain_total: float
) -> None:
    print(f"\n== simulation vs {label}")
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
