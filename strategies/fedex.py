"""FedEx-LoRA (Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", ACL 2025): FedAvg on A and B, with the averaging
error folded into the base weights.

The server averages A and B as FedAvg does (B_bar = sum p_k B_k, A_bar = sum p_k A_k)
and every client adds the residual

    s (sum_k p_k B_k A_k - B_bar A_bar)

to its base weights, so W0 + residual + s B_bar A_bar = W0 + s sum_k p_k B_k A_k:
the global model is the exact mean of the clients' models. The residual is sent in
factored form, B_res = [B_1 | ... | B_K | B_bar] and A_res = [p_1 A_1; ...; p_K A_K;
-A_bar], of rank (K + 1) r, which is smaller than the dense d_out x d_in matrix
whenever (K + 1) r (d_out + d_in) < d_out d_in (about 4x smaller for MiniLM's
384 x 384 with K = 5, r = 8). A node that skipped rounds receives the residuals of
the rounds it missed, or their dense sum when that is smaller (``fedlora/federation/folding.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.lora import Role, Tensors
from strategies.base import Strategy, stack


class FedEx(Strategy):
    """FedAvg's factors (the default ``aggregate``), plus the exact residual in the base weights."""

    name = "fedex"
    server_optimizers = ("none",)
    robust_aggregation = False  # it folds every client's exact B_k A_k residual: a robust mean breaks it
    user_level_dp = False
    secure_aggregation = False
    secure_note = "fedex folds the residual sum_k p_k B_k A_k - B_bar A_bar, which needs each client's own factors"
    user_dp_note = (
        "fedex folds the residual sum_k p_k B_k A_k - B_bar A_bar, a product of each client's factors whose "
        "sensitivity the clipped mean does not bound"
    )
    server_optimizer_note = (
        "fedex folds the exact residual of the average into W0; "
        "a server step on A and B would leave that residual inexact"
    )

    def fold(self, state: Tensors, payloads: Sequence[Tensors], p: torch.Tensor) -> Tensors:
        """The residual sum_k p_k B_k A_k - B_bar A_bar as factors [B_k.. | B_bar], [p_k A_k..; -A_bar]."""
        stacked = stack(payloads, p)
        for key in list(stacked):
            if key.role is Role.A:
                stacked[key] = torch.cat([stacked[key], -state[key]])
            else:
                stacked[key] = torch.cat([stacked[key], state[key]], dim=1)
        return stacked
