"""RoLoRA (Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA",
NeurIPS 2025).

Rounds alternate which factor clients train and send: B in odd rounds (A frozen), A in
even rounds (B frozen). Within a round every client shares the frozen factor, so the
average is exact, as in FFA-LoRA, but both factors learn over the run:

    odd rounds:   sum_k p_k s B_k A = s (sum_k p_k B_k) A,
    even rounds:  sum_k p_k s B A_k = s B (sum_k p_k A_k).

Upload per adapted weight: d_out * r in B rounds, r * d_in in A rounds (one factor);
download: both factors, since either may have changed since a node's last round.

Order and initialisation: peft's (A Kaiming-uniform, B = 0), and B first. With B = 0
the gradient of A is zero (dL/dA = s B^T dL/dW), so an A round first would be lost;
the FedLLM-Factory re-implementation alternates the same way (B in odd rounds). The
paper alternates per round too; it also analyses a variant with A and B updated in
one round in turn (two uploads per round), which is not implemented here.

Sample-level DP (``privacy=dp``): DP-SGD privatises the round's factor; the frozen one is
the previous aggregate, public to the clients. User-level DP (``privacy=user``): the
round's update (one factor and the head) is clipped to C as in FedAvg.
"""

from __future__ import annotations

from fedlora.lora import AdapterKey, Role
from strategies.base import Strategy


def factor_of(server_round: int) -> Role:
    """The factor clients train in ``server_round`` (rounds count from 1): B in odd rounds, A in even."""
    return Role.B if server_round % 2 else Role.A


class RoLoRA(Strategy):
    """Train and average one factor per round, the other frozen; the default ``aggregate`` is exact."""

    name = "rolora"

    def trains(self, key: AdapterKey, *, server_round: int) -> bool:
        return key.role is factor_of(server_round)
