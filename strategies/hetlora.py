"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024).

Clients train adapters of their own ranks r_k (``client_ranks``, as in FLoRA): client k
starts from the global adapter truncated to its rank (A's first r_k rows, B's first r_k
columns) and sends A_k and B_k. The server zero-pads them to the largest rank and
averages each module with sparsity weights, the norm of the client's product:

    w_k = p_k ||B_k A_k||_F / sum_j p_j ||B_j A_j||_F,   A = sum_k w_k pad(A_k),   B = sum_k w_k pad(B_k),

so a client whose adapter does little counts little (with uniform p, the paper's
weights). Directions beyond r_k get zeros from client k: the higher directions
shrink towards zero unless the larger-rank clients keep them up. Like FedAvg on LoRA
the average is of the factors, not of the products, and so inexact.

Rank self-pruning (``prune_lambda`` > 0; :class:`strategies.ranks.SelfPruning`): while it
trains, a client of rank r penalises lambda ||B[:, t:r]||_F ||A[t:r]||_F summed over modules,
its tail from t = floor(gamma r); when the tail's size ends a round below where it ended the
client's previous round, the client drops those directions for good (its node state keeps
its rank) and sends rank t from then on. The server accepts any rank up to the assigned one
and zero-pads it like any other. Off by default: the paper gives no lambda for a task like ours.

Where this differs from the paper: the weights are per module (the paper's norm is of
each client's LoRA update; per module keeps a layer one client barely moved from being
weighted by the others); the penalty is the upper bound ||B_t|| ||A_t|| of the paper's
||B_t A_t|| and is taken as a proximal step after each optimiser step (decoupled, as AdamW's
weight decay) rather than as a term of the loss, so that DP-SGD never clips or noises it (it
reads no example); a client sends its pruned adapter in the round it prunes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedlora.lora import Role, Tensors
from strategies.base import Combine, Strategy, average_payloads, by_role, partner, weighted_mean
from strategies.ranks import HeterogeneousRanks, PruningConfig, SelfPruning, product_norm


def sparsity_weights(norms: Sequence[float], p: torch.Tensor) -> torch.Tensor:
    """w_k proportional to p_k times the k-th norm; p itself when every norm is zero."""
    w = p.double() * torch.tensor(norms, dtype=torch.float64)
    return w / w.sum() if w.sum() > 0 else p.double()


def pad(tensor: torch.Tensor, role: Role, rank: int) -> torch.Tensor:
    """A's rows or B's columns zero-padded to ``rank``."""
    missing = rank - (tensor.shape[0] if role is Role.A else tensor.shape[1])
    return F.pad(tensor, (0, 0, 0, missing)) if role is Role.A else F.pad(tensor, (0, missing))


class HetLoRA(SelfPruning, HeterogeneousRanks, Strategy):
    """Zero-pad the clients' adapters to the largest rank, average them with sparsity weights."""

    name = "hetlora"
    config_class = PruningConfig
    robust_aggregation = False
    robust_note = "its weights are the clients' own update norms, which a robust mean would not bound"
    user_level_dp = False
    secure_aggregation = False
    secure_note = "hetlora weights each client by the norm of its own adapter, which only that adapter shows"
    user_dp_note = (
        "hetlora weights each client by the norm of its own adapter, so one client moves the weights of all: "
        "a sum of clipped updates no longer bounds its effect"
    )

    def aggregate(
        self,
        state: Tensors,
        payloads: Sequence[Tensors],
        p: torch.Tensor,
        *,
        server_round: int = 1,
        combine: Combine = weighted_mean,
    ) -> Tensors:
        """The head averaged by p; each module's A and B the sparsity-weighted mean of the padded factors."""
        new = average_payloads(state, [by_role(payload, Role.DENSE) for payload in payloads], p)
        for b_key in sorted(k for k in payloads[0] if k.role is Role.B):
            a_key = partner(b_key, Role.A)
            rank = state[b_key].shape[1]
            w = sparsity_weights([product_norm(pl[b_key], pl[a_key]) for pl in payloads], p)
            for key in (a_key, b_key):
                new[key] = weighted_mean([pad(pl[key], key.role, rank) for pl in payloads], w)
        return new
