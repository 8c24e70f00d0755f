"""Helpers shared by the strategy tests: small random float64 adapters and strategies."""

from __future__ import annotations

import torch

from fedlora.federation.server_step import server_step as federation_step
from fedlora.lora import AdapterKey, Role
from strategies import get_strategy_class

D_OUT, D_IN, R = 6, 5, 3
MODULES = ("enc.0.query", "enc.0.value", "enc.1.query")


def random_adapter(generator: torch.Generator, *, with_r: bool = False) -> dict[AdapterKey, torch.Tensor]:
    tensors = {}
    for m in MODULES:
        tensors[AdapterKey(m, Role.A)] = torch.randn(R, D_IN, generator=generator, dtype=torch.float64)
        tensors[AdapterKey(m, Role.B)] = torch.randn(D_OUT, R, generator=generator, dtype=torch.float64)
        if with_r:
            tensors[AdapterKey(m, Role.R)] = torch.randn(R, R, generator=generator, dtype=torch.float64)
    tensors[AdapterKey("classifier", Role.DENSE, "weight")] = torch.randn(
        4, D_OUT, generator=generator, dtype=torch.float64
    )
    return tensors


def make(name: str, **fields):
    cls = get_strategy_class(name)
    return cls(cls.config_class(name=name, **fields), scaling=2.0)


def server_step(strategy, state: dict, payloads: list[dict], p: torch.Tensor, *, server_round: int = 1) -> dict:
    """The server's state after a round without a server optimiser (the run's one server step)."""
    return federation_step(strategy, state, payloads, p, server_round=server_round).state
