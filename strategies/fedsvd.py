"""FedSVD ("FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA").

Clients train and send only B, with A frozen during the round (as in FFA-LoRA).
The server averages B and refactorises the aggregate update:

    B_bar = sum_k p_k B_k;  M = B_bar A = U S V^T (thin SVD, rank <= r);
    A <- V_r^T (orthonormal rows);  B <- U_r S_r.

Since rank(M) <= r, the new B A equals M exactly: the global update is unchanged,
only re-parameterised so that A spans the principal directions of the aggregate
update. Both A and B are broadcast (download d_out*r + r*d_in); upload stays
d_out*r. ``refactor_every`` (default 1: every round) sets how often.

The SVD is done on the small factors: B_bar = Q_b R_b and A^T = Q_a R_a (thin QR),
then the r x r SVD R_b R_a^T = U' S V'^T gives U = Q_b U', V = Q_a V'. Same result
as an SVD of the d_out x d_in product, in O((d_out + d_in) r^2) instead of
O(d_out d_in r). ``alpha`` works as in FFA-LoRA (same default), since B alone learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.lora import AdapterKey, Role, Tensors
from strategies.base import partner
from strategies.ffa_lora import FFALora, FFALoraConfig


@dataclass(frozen=True)
class FedSVDConfig(FFALoraConfig):
    """``refactor_every``: refactorise A, B every this many rounds (1: every round)."""

    refactor_every: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.refactor_every < 1:
            raise ValueError(f"strategy.refactor_every must be >= 1, got {self.refactor_every}")


def refactorise(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with B' A' = B A, A' orthonormal rows, B' = U S. B: (d_out, r); A: (r, d_in).

    Computed from thin QRs of B and A^T and an r x r SVD, in float64.
    """
    q_b, r_b = torch.linalg.qr(b.to(torch.float64))  # (d_out, r), (r, r)
    q_a, r_a = torch.linalg.qr(a.to(torch.float64).T)  # (d_in, r), (r, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # r x r
    new_b = (q_b @ u) * s  # U S: (d_out, r)
    new_a = vh @ q_a.T  # V^T: (r, d_in)
    return new_b.to(b.dtype), new_a.to(a.dtype)


class FedSVD(FFALora):
    """FFA-LoRA's B-only training (B_bar, the default ``aggregate``), then an SVD refactorisation of B_bar A
    on the server (``refine``, after a server optimiser's step).

    User-level DP (``privacy=user``): B_bar is FFA-LoRA's noisy mean (sensitivity C of the sum of
    clipped updates of B and the head); the refactorisation only post-processes it.
    """

    name = "fedsvd"
    config_class = FedSVDConfig
    server_optimizers = ("none", "momentum")
    server_optimizer_note = (
        "fedsvd re-bases B every refactor_every rounds; momentum moves with the basis, element-wise second "
        "moments (adam, yogi, adagrad) cannot"
    )

    def refine(self, state: Tensors, *, server_round: int = 1) -> tuple[Tensors, dict[AdapterKey, torch.Tensor]]:
        """(B, A) <- (U_r S_r, V_r^T) of B A when the round is due; B's change of basis is T = A A'^T.

        With A' orthonormal rows spanning A's row space, B T A' = B A: a server optimiser's
        momentum in B's coordinates moves by the same T.
        """
        if server_round % self.config.refactor_every:
            return state, {}
        new, changes = dict(state), {}
        for key in sorted(k for k in state if k.role is Role.B):
            a_key = partner(key, Role.A)
            new[key], new[a_key] = refactorise(state[key], state[a_key])
            changes[key] = state[a_key].double() @ new[a_key].double().T
        return new, changes

    def broadcast(self, state: Tensors) -> Tensors:
        """A changes on the server, so both A and B go down."""
        return dict(state)
