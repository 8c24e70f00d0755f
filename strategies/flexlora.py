"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", NeurIPS 2024).

Clients train adapters of their own ranks r_k (``client_ranks``, as in FLoRA) and send
A_k and B_k. The server averages the full products and re-factorises the average by SVD:

    M = sum_k p_k B_k A_k = U S V^T;   B = U_r S_r^(1/2),   A = S_r^(1/2) V_r^T,   r = max_k r_k,

and client k starts the next round from the first r_k directions, which are the best
rank-r_k approximation of M (Eckart-Young: the SVD's leading directions are nested).
The scale s = alpha / r is the same everywhere (``strategies/ranks.py``), so averaging
s B_k A_k is averaging B_k A_k.

The SVD is taken of the stacked factors (B = [B_1 | ... | B_K], A = [p_1 A_1; ...], whose
product is M), through thin QRs and an SVD of a (sum r_k)-square matrix, as in FedSVD:
M itself (d_out x d_in) is never formed. ``aggregate_report`` gives ``truncation``, the
part of M that the rank-r factors lose, ||M - B A||_F / ||M||_F over all modules.

Choices the paper leaves open or that differ: the singular values are split evenly
between B and A (S^(1/2) each), so neither factor starts much larger than the other;
clients keep ``lora.rank``'s scale whatever their rank; the weights p_k are the run's
(``weighting``), examples by default, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.lora import Role, Tensors
from strategies.base import Combine, Strategy, average_payloads, by_role, partner, stack, weighted_mean
from strategies.ranks import HeterogeneousRanks, RankedConfig


def truncated_product(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-``rank`` factors of B A (B: (d_out, R), A: (R, d_in)), S^(1/2) on each side, zero-padded
    to ``rank`` when B A has lower rank; and ||B A||_F^2 and the squared error of the truncation."""
    q_b, r_b = torch.linalg.qr(b.to(torch.float64))
    q_a, r_a = torch.linalg.qr(a.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # B A = (Q_b U) S (Q_a V)^T
    kept = min(rank, len(s))
    root = s[:kept].sqrt()
    new_b = torch.zeros(b.shape[0], rank, dtype=torch.float64)
    new_a = torch.zeros(rank, a.shape[1], dtype=torch.float64)
    new_b[:, :kept] = (q_b @ u[:, :kept]) * root
    new_a[:kept] = root[:, None] * (vh[:kept] @ q_a.T)
    total, lost = float(s.square().sum()), float(s[kept:].square().sum())
    return new_b.to(b.dtype), new_a.to(a.dtype), total, lost


class FlexLoRA(HeterogeneousRanks, Strategy):
    """Average the products B_k A_k, hand each client the truncated SVD of its rank."""

    name = "flexlora"
    config_class = RankedConfig
    metric_columns = ("truncation",)
    server_optimizers = ("none",)
    server_optimizer_note = (
        "flexlora's server step re-factorises the average product by SVD; the factors' coordinates change every "
        "round, so there is no fixed parameter for a server optimiser to step on"
    )
    robust_aggregation = False
    robust_note = "it re-factorises the mean of the clients' full products B_k A_k by SVD, not an average of factors"
    user_level_dp = False
    secure_aggregation = False
    secure_note = "flexlora averages the products B_k A_k, which needs each client's own factors"
    user_dp_note = (
        "flexlora averages the products B_k A_k, which are not linear in a client's update: clipping the "
        "factors' change does not bound a client's effect on the sum"
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
        return self.aggregate_report(state, payloads, p, server_round=server_round, combine=combine)[0]

    def aggregate_report(
        self,
        state: Tensors,
        payloads: Sequence[Tensors],
        p: torch.Tensor,
        *,
        server_round: int = 1,
        combine: Combine = weighted_mean,
    ) -> tuple[Tensors, dict[str, float]]:
        """The head averaged; each module's (B, A) the model-rank SVD factors of sum_k p_k B_k A_k."""
        new = average_payloads(state, [by_role(payload, Role.DENSE) for payload in payloads], p)
        stacked = stack(payloads, p)
        total = lost = 0.0
        for b_key in sorted(k for k in stacked if k.role is Role.B):
            a_key = partner(b_key, Role.A)
            rank = state[b_key].shape[1]
            new[b_key], new[a_key], module_total, module_lost = truncated_product(stacked[b_key], stacked[a_key], rank)
            total, lost = total + module_total, lost + module_lost
        return new, {"truncation": (lost / total) ** 0.5 if total > 0 else 0.0}
