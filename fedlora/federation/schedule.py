"""Which clients train in which round: seeded by (seed, round), so known in advance.

The Flower strategy samples with :func:`sample_partitions`; the privacy planner
counts with :func:`rounds_taken` how many rounds a client is scheduled for, so its
noise can be calibrated for all of them before the run starts.
"""

from __future__ import annotations

from fedlora.config.run import RunConfig
from fedlora.seeds import client_sampling


def sample_partitions(partitions: list[int], k: int, *, seed: int, server_round: int) -> list[int]:
    """``k`` of ``partitions`` (all, if fewer), drawn by a generator seeded by (seed, round); sorted."""
    rng = client_sampling(seed, server_round)
    return sorted(rng.sample(sorted(partitions), min(k, len(partitions))))


def scheduled(cfg: RunConfig, server_round: int) -> list[int]:
    """The partitions sampled in ``server_round`` when all ``cfg.clients`` nodes are connected."""
    return sample_partitions(list(range(cfg.clients)), cfg.sampled_per_round, seed=cfg.seed, server_round=server_round)


def rounds_taken(cfg: RunConfig, partition_id: int) -> int:
    """How many of rounds 1..``cfg.rounds`` the schedule samples ``partition_id`` for."""
    return sum(partition_id in scheduled(cfg, r) for r in range(1, cfg.rounds + 1))
