"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025; authors' code Pengxin-Guo/FedSA-LoRA, on FederatedScope).

Clients train both factors; only A is sent and averaged, B stays on each client. The
paper's analysis: A learns what is common to the clients, B what is specific to each,
so sharing A and keeping B personalises. Per adapted weight, client k's model is
s B_k A with A = sum_j p_j A_j, and the upload is r d_in (A only, plus a trained head).

B is *personal* (``Strategy.personal``): a node keeps its B in its Flower node state
between rounds (simulation and deployment alike) and a client sampled for the first
time starts from the initial B (peft's zeros). The server never sees a B: its state
keeps the initial B, so the global model (what ``export`` writes and the server
evaluates) is the averaged A with B = 0, plus the averaged head: the base model's
features with the federated head. That is the authors' global model too (the server
aggregates A only); FedSA-LoRA's own numbers are personalised ones, each client's
model on its own test data (``fedlora``'s personalised evaluation).

User-level DP (``privacy=user``): the update is A's change and the head's, clipped to C
as in FedAvg; B never leaves the client, so it needs no protection beyond DP-SGD's
(``privacy=dp`` trains both factors with DP-SGD; B is never released).
"""

from __future__ import annotations

from fedlora.lora import AdapterKey, Role, Tensors
from strategies.base import Strategy


class FedSALora(Strategy):
    """Average A (the default ``aggregate`` over what is sent); B personal, kept by each client."""

    name = "fedsa_lora"

    def personal(self, key: AdapterKey) -> bool:
        return key.role is Role.B

    def payload(self, trained: Tensors) -> Tensors:
        """Everything trained but B."""
        return {k: v for k, v in trained.items() if k.role is not Role.B}

    def broadcast(self, state: Tensors) -> Tensors:
        """A and the head: each client has its own B."""
        return {k: v for k, v in state.items() if k.role is not Role.B}
