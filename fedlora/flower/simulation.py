"""Flower's simulation engine (Ray) around the same ServerApp and ClientApp a deployment runs.

The apps receive the run's config as a deployment gives it, the Flower App run config
(:func:`fedlora.config.app.run_config_for`), by closure: ``run_simulation`` takes no
run config. Each virtual client gets ``simulation.num_cpus`` CPUs and
``simulation.num_gpus`` GPUs from Ray (fractions share a GPU); Ray sets each actor's
thread count to its CPUs; ``simulation.parallel_clients`` caps how many it trains at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from functools import partial

from fedlora.config.app import run_config_for
from fedlora.config.run import RunConfig
from fedlora.federation.stopping import STOP_FILE_ENV, Interrupted, Signals, stop_file, stop_on_signals
from fedlora.flower.client_app import make_client_app
from fedlora.flower.engine import SimulatedNodes, scaled_engine
from fedlora.flower.ray_pool import resilient_ray_backend
from fedlora.flower.server_app import ProgressCallback, RoundCallback, make_server_app


def run_flower_simulation(
    cfg: RunConfig,
    *,
    verbose: bool = False,
    on_round: RoundCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> Signals:
    """Run ``cfg`` on ``cfg.clients`` virtual SuperNodes; ``on_round(row)`` after every round's metrics row,
    ``on_progress(replies, messages)`` as a round's replies arrive.

    Returns the signal that stopped the run, if one did: Ctrl-C or SIGTERM stop the clients at their
    next micro-batch and the server at its next wait (:mod:`fedlora.federation.stopping`), Ray is shut
    down, and the output folder holds the last finished round's checkpoint and metrics.
    """
    from fedlora.learning.model import set_threads

    run_config = run_config_for(simulated(cfg))
    init_args = ray_init_args(cfg, verbose=verbose)
    backend = {
        "client_resources": {"num_cpus": cfg.simulation.num_cpus, "num_gpus": cfg.simulation.num_gpus},
        "init_args": init_args,
    }
    set_threads(cfg.simulation.num_cpus)  # the server's evaluation, beside the clients
    with stop_file():  # named before Ray starts, so that its workers inherit it
        init_ray(init_args)  # before our signal handlers: Ray's driver turns SIGTERM into a bare sys.exit
        return _run(cfg, run_config, backend, verbose=verbose, on_round=on_round, on_progress=on_progress)


def ray_init_args(cfg: RunConfig, *, verbose: bool = False) -> dict:
    """``ray.init``'s arguments: ``simulation.ray_address`` or a Ray of this process's own, even beside a
    cluster started on this machine (which ray.init would join), declared ``parallel_clients`` clients'
    CPUs when that is set: Flower starts one worker (one model copy) per client that fits."""
    args: dict = {"logging_level": logging.INFO if verbose else logging.WARNING, "log_to_driver": verbose}
    args["address"] = cfg.simulation.ray_address or "local"
    if cfg.simulation.local_cpus is not None:
        args["num_cpus"] = cfg.simulation.local_cpus
    return args


def simulated(cfg: RunConfig) -> RunConfig:
    """``cfg`` as the simulation's ServerApp runs it: no straggler cut (``server.straggler_factor``). Flower's
    simulation engine answers for every message (a reply or an error), so no node keeps silent; and clients
    queued on few Ray workers, or of very different sizes under ``train.local_epochs``, finish far apart
    without being stragglers: a cut would drop them."""
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, straggler_factor=None))


def _run(cfg: RunConfig, run_config: dict, backend: dict, *, verbose: bool, on_round: RoundCallback | None,
         on_progress: ProgressCallback | None) -> Signals:  # fmt: skip
    from flwr.simulation import run_simulation

    engine_nodes = SimulatedNodes()
    partitions = partial(engine_nodes.table, timeout=cfg.server.node_timeout)
    server_app = make_server_app(run_config, on_round=on_round, on_progress=on_progress, partitions=partitions,
                                 simulation=cfg.simulation)  # fmt: skip
    with stop_on_signals() as signals, resilient_ray_backend(), scaled_engine(engine_nodes):
        try:
            run_simulation(
                server_app=server_app,
                client_app=make_client_app(run_config),
                num_supernodes=cfg.clients,
                backend_config=backend,
                verbose_logging=verbose,
            )
        except (Interrupted, RuntimeError):
            if signals.received is None:
                raise
        finally:
            shutdown_ray()
    return signals


def init_ray(init_args: dict) -> None:
    """Start Ray as Flower's Ray backend would (which then finds it started and uses it)."""
    import ray

    if ray.is_initialized():
        return
    # Ray's workers inherit the environment, not this process's sys.path
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    env = {"PYTHONPATH": pythonpath}
    if STOP_FILE_ENV in os.environ:  # the clients' stop file (:mod:`fedlora.federation.stopping`)
        env[STOP_FILE_ENV] = os.environ[STOP_FILE_ENV]
    ray.init(runtime_env={"env_vars": env}, include_dashboard=False, **init_args)


def shutdown_ray() -> None:
    """Flower shuts Ray down when the run ends; after an interruption, make sure."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
