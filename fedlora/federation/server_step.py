"""The server's step after a round, in one place: aggregate -> server optimiser -> refine -> rebase.

``FlowerRounds`` (plain and user-level rounds alike), the centralised and test helpers call this and
nothing else combines payloads into a new state. It assigns nothing on the strategy and returns what
the round produced: the new state, the strategy's diagnostics (``metric_columns``) and the factors
that join the base weights (FLoRA, FedEx). The server optimiser's moments advance with the step, as a
torch optimiser's do; they are its own state (checkpointed with the run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedlora.lora import Tensors
from strategies.base import Combine, Strategy, weighted_mean
from strategies.server_opt import ServerOptimizer


@dataclass(frozen=True)
class StepResult:
    """What one server step produced."""

    state: Tensors  # the next global state
    report: dict[str, float] = field(default_factory=dict)  # the strategy's diagnostics, by metric_columns
    fold: Tensors = field(default_factory=dict)  # factors whose s * B_f A_f joins the base weights; empty: none


def server_step(
    strategy: Strategy,
    state: Tensors,
    payloads: Sequence[Tensors],
    p: torch.Tensor,
    *,
    server_round: int = 1,
    optimizer: ServerOptimizer | None = None,
    combine: Combine = weighted_mean,
) -> StepResult:
    """The state after a round from the clients' ``payloads`` and their normalised weights ``p``.

    The strategy's aggregate is the target of the server optimiser's step (none: the aggregate
    itself); the strategy may then re-parameterise (FedSVD), and the optimiser's moments follow
    the change of basis. ``combine``: what averaging means (``server.aggregation``)."""
    target, report = strategy.aggregate_report(state, payloads, p, server_round=server_round, combine=combine)
    stepped = optimizer.step(state, target, keys=payloads[0].keys()) if optimizer is not None else target
    new, changes = strategy.refine(stepped, server_round=server_round)
    if optimizer is not None:
        optimizer.rebase(changes)
    return StepResult(new, report, strategy.fold(new, payloads, p))
