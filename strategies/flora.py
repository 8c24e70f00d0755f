"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024; authors' code ATP-1010/FederatedLLM).

Every round each sampled client attaches a fresh LoRA (A drawn at random, B = 0) of
its own rank r_k on top of the current merged base weights, trains A and B, and
sends both. The server stacks the K replies,

    B = [B_1 | ... | B_K]  (d_out, sum r_k),    A = [p_1 A_1; ...; p_K A_K]  (sum r_k, d_in),

so that s B A = sum_k p_k s B_k A_k exactly (only A carries p_k), and everyone
folds it into the base weights: W0 <- W0 + s B A. The stacked rank is the sum of
the ranks of the clients that replied this round. There is no global adapter to
average: a trained head (``train.head=train``) is averaged as in FedAvg.

Heterogeneous ranks (``client_ranks``, ``strategies/ranks.py``): the model is built with the
largest rank, a client of rank r_k trains and sends its first r_k directions, and the scale
s = alpha / r is the same for every client and the server.

Where this differs from the authors' code: they hard-code the stacked rank as
rank * num_clients, which breaks under partial participation (here it is the sum
over the replies); their FedAvg path averages client 0's weights only (a misspelled
variable), which is not repeated in ``fedavg.py``; and they simulate every client
on one shared model, so clients that skip rounds never arise. Here such a client
catches up by receiving the stacked factors of the rounds it missed, or the
accumulated delta when that is smaller (``fedlora/federation/folding.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.lora import LORA_ROLES, Role, Tensors
from strategies.base import (
    Combine,
    Strategy,
    average_payloads,
    by_role,
    kaiming_a,
    stack,
    weighted_mean,
)
from strategies.ranks import HeterogeneousRanks, RankedConfig


@dataclass(frozen=True)
class FLoRAConfig(RankedConfig):
    """FLoRA's settings are the heterogeneous ranks' (``strategies.ranks.RankedConfig``)."""


class FLoRA(HeterogeneousRanks, Strategy):
    """Stack the clients' adapters, fold them into the base weights, start afresh."""

    name = "flora"
    config_class = FLoRAConfig
    server_optimizers = ("none",)
    robust_aggregation = False  # it stacks every client's adapter exactly: no average to make robust
    user_level_dp = False
    secure_aggregation = False
    secure_note = "flora stacks every client's own factors, which a sum does not keep apart"
    user_dp_note = (
        "flora stacks every client's own factors into the base weights; a per-client release has no average "
        "to noise once"
    )
    server_optimizer_note = (
        "flora's server step stacks the clients' adapters and folds them into W0; "
        "it is not an average of updates for a server optimiser to step on"
    )

    def initial_state(self, adapters: Tensors, *, generator: torch.Generator) -> Tensors:
        """B = 0: the global model is the merged base weights (plus a head), no adapter on top."""
        return {k: torch.zeros_like(v) if k.role is Role.B else v for k, v in adapters.items()}

    def start(self, received: Tensors, *, like: Tensors, generator: torch.Generator) -> Tensors:
        """A fresh adapter every round: A drawn from the client's generator, B = 0."""
        fresh = {}
        for key in sorted(like):
            if key.role is Role.A:
                fresh[key] = kaiming_a(like[key], generator=generator)
            elif key.role is Role.B:
                fresh[key] = torch.zeros_like(like[key])
        return fresh | received

    def broadcast(self, state: Tensors) -> Tensors:
        """Only non-LoRA tensors (a trained head): clients draw their adapters themselves."""
        return {k: v for k, v in state.items() if k.role not in LORA_ROLES}

    def aggregate(
        self,
        state: Tensors,
        payloads: Sequence[Tensors],
        p: torch.Tensor,
        *,
        server_round: int = 1,
        combine: Combine = weighted_mean,
    ) -> Tensors:
        """The head averaged (by the weighted mean: stacking is exact, robust_aggregation is off); the
        adapter stays at B = 0 (its update is folded, see ``fold``)."""
        return average_payloads(state, [by_role(payload, Role.DENSE) for payload in payloads], p)

    def fold(self, state: Tensors, payloads: Sequence[Tensors], p: torch.Tensor) -> Tensors:
        """The stacked factors: s B A = sum_k p_k s B_k A_k."""
        return stack(payloads, p)
