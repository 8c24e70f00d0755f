"""Fed-SB (Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
Performance in (Private) Federated LoRA Fine-Tuning"), on LoRA-SB's initialisation (Ponkshe et
al., "Initialization using Update Approximation is a Silver Bullet for Extremely Efficient
Low-Rank Fine-Tuning").

Adapter per weight W0 (d_out, d_in): dW = B R A, with B (d_out, r) and A (r, d_in)
fixed for the run and only R (r, r) trained and sent; scaling 1 (alpha = r, so
``lora.alpha`` is not used). Averaging R is exact: sum_k p_k B R_k A = B (sum_k p_k R_k) A.
Upload per adapted weight: r * r numbers, independent of d_in and d_out.

LoRA-SB initialisation: accumulate the full-weight gradients sum grad W0 over
``init_samples`` examples, with no adapter; approximate the first Adam step of full
fine-tuning by G = -eta_1 sign(sum grad W0); rank-r SVD G^T ~ U S V^T; set A = U^T,
B = V, R_0 = diag(S). Then B R_0 A is the rank-r approximation of G, B has
orthonormal columns and A orthonormal rows.

eta_1 is the learning rate of the first step of a linear warm-up, as the authors
compute it: eta_1 = lr / (``init_warmup_ratio`` * T), with lr = ``train.lr`` and T the
optimizer steps a client's model takes over the run (rounds x local steps per round).
The authors' GLUE code uses warmup_ratio 0.06 (the default here) and their DP script
1 (eta_1 = lr / T); ``init_lr`` sets eta_1 directly. So R_0's entries are of the size of
one early step, not of a whole step at the full lr (which would outweigh many rounds
of training).
``init_svd=lowrank`` uses ``torch.svd_lowrank(G.T, q=r, niter=init_svd_iters)``
(seeded; the authors use 10 iterations: within about 0.1% of the best rank-r residual
on gradient-sign matrices, against 0.6-0.8% with torch's default 2);
``init_svd=exact`` a full SVD (the best rank-r approximation exactly).

Where the gradient comes from (``init_source``), and how this differs from the
authors' code:
- The authors compute it on the pooled training data, which a federation cannot
  see. ``clients`` (default): the clients sampled for round 0 each send the summed
  gradient of the adapted base weights over their share of ``init_samples``
  examples, once; the server sums them before sign() and SVD. This one-off upload
  (d_out * d_in per adapted weight and client) is counted in round 0 of
  metrics.csv. A file path instead: a public calibration set, in the data
  set's format and labels, that the server uses itself (no upload).
- Under DP, that gradient is a release of private data. The authors' code leaves
  it unprotected; here (``fedlora.privacy.dp_sgd``) each client takes a Poisson subsample
  of its data with private randomness, clips each example's gradient, adds Gaussian
  noise to the sum and charges the release to its privacy ledger; or the gradient
  comes from a public calibration file and nothing is released.
- A and B are sent once to each node (``fixed``) and kept by the node; every round
  moves only R (and a trained head).
- The authors' multi-round scripts never clear the list of client results, so later
  rounds average stale R's; here each round aggregates only that round's replies.
  Their DP code sets delta = 1 / #batches, above 1 / n; ours must keep delta < 1 / n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedlora.lora import Role, Tensors, insert_r
from strategies.base import GradientInit, Strategy, StrategyConfig, by_role, partner

INIT_SVDS = ("lowrank", "exact")


@dataclass(frozen=True)
class FedSBConfig(StrategyConfig):
    """LoRA-SB initialisation: ``init_source`` (``clients`` or a calibration file), ``init_samples``
    examples in all, first-step learning rate ``init_lr`` (None: the warm-up formula with
    ``init_warmup_ratio``), ``init_svd`` and its ``init_svd_iters``."""

    client_lr: float | None = 2e-2  # R-only training wants a larger step (conf/strategy/fed_sb.yaml agrees)
    init_source: str = "clients"
    init_samples: int = 256
    init_lr: float | None = None
    init_warmup_ratio: float = 0.06
    init_svd: str = "lowrank"
    init_svd_iters: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.init_source:
            raise ValueError("strategy.init_source must be 'clients' or a calibration file")
        if self.init_samples < 1:
            raise ValueError(f"strategy.init_samples must be >= 1, got {self.init_samples}")
        if self.init_lr is not None and self.init_lr <= 0:
            raise ValueError(f"strategy.init_lr must be > 0, got {self.init_lr}")
        if not 0 < self.init_warmup_ratio <= 1:
            raise ValueError(f"strategy.init_warmup_ratio must be in (0, 1], got {self.init_warmup_ratio}")
        if self.init_svd not in INIT_SVDS:
            raise ValueError(f"strategy.init_svd must be one of {list(INIT_SVDS)}, got {self.init_svd!r}")
        if self.init_svd_iters < 0:
            raise ValueError(f"strategy.init_svd_iters must be >= 0, got {self.init_svd_iters}")

    def first_step_lr(self, *, lr: float, total_steps: int) -> float:
        """eta_1: ``init_lr``, or lr / (init_warmup_ratio * total_steps), the first step of a linear warm-up."""
        if self.init_lr is not None:
            return self.init_lr
        return lr / (self.init_warmup_ratio * max(1, total_steps))


def lora_sb_factors(
    gradient: torch.Tensor, *, rank: int, lr: float, exact: bool, generator: torch.Generator, niter: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, R_0, A) with B R_0 A ~ G = -lr sign(gradient). gradient: (d_out, d_in).

    B: (d_out, r), orthonormal columns; R_0 = diag(S): (r, r); A: (r, d_in), orthonormal rows.
    """
    g = -lr * torch.sign(gradient.to(torch.float64))
    if exact:
        u, s, vh = torch.linalg.svd(g.T, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    else:
        # svd_lowrank draws its sketch from torch's global generator: seed it from ours. Its power
        # iterations amplify rounding differences where singular values are close, and a matrix
        # product's rounding depends on the thread count: one thread, so that every process and
        # machine computes the same factors.
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
                u, s, v = torch.svd_lowrank(g.T, q=rank, niter=niter)
        finally:
            torch.set_num_threads(threads)
    dtype = gradient.dtype
    return v.to(dtype), torch.diag(s).to(dtype), u.T.contiguous().to(dtype)


class FedSB(Strategy):
    """Train and average the r x r matrix R (R <- sum_k p_k R_k, the default ``aggregate``) between fixed,
    LoRA-SB-initialised B and A.

    User-level DP (``privacy=user``): the update (R_k - R and the head's) clipped to C: sensitivity C
    of the sum, over r^2 numbers per module, so the noise norm is sqrt(r^2 / (2 r d)) of FedAvg's for
    the same sigma. The initialisation must come from a public calibration file
    (``strategy.init_source``): the clients' round-0 gradients are outside the user-level guarantee.
    """

    name = "fed_sb"
    config_class = FedSBConfig
    adapter_roles = frozenset({Role.A, Role.B, Role.R})

    @classmethod
    def lora_alpha(cls, config: StrategyConfig, *, rank: int, alpha: float) -> float:
        return float(rank)  # s = 1: R carries the update's scale

    @property
    def gradient_init(self) -> GradientInit:
        return GradientInit(source=self.config.init_source, samples=self.config.init_samples)

    def prepare_model(self, model: nn.Module) -> None:
        insert_r(model)  # an identity R between every LoRA A and B

    def trainable(self, key) -> bool:
        return key.role is Role.R

    def initialise(
        self, state: Tensors, gradients: Tensors, *, lr: float, total_steps: int, generator: torch.Generator
    ) -> Tensors:
        """A, B, R_0 of every adapted module from its summed base-weight gradient (``Role.BASE``).

        ``lr``, ``total_steps``: the clients' learning rate and optimizer steps over the run (for eta_1).
        """
        lr = self.config.first_step_lr(lr=lr, total_steps=total_steps)
        new = dict(state)
        for key in sorted(by_role(gradients, Role.BASE)):
            a_key = partner(key, Role.A)
            rank = state[a_key].shape[0]
            b, r0, a = lora_sb_factors(
                gradients[key],
                rank=rank,
                lr=lr,
                exact=self.config.init_svd == "exact",
                generator=generator,
                niter=self.config.init_svd_iters,
            )
            new[partner(key, Role.B)], new[partner(key, Role.R)], new[a_key] = b, r0, a
        return new

    def broadcast(self, state: Tensors) -> Tensors:
        return {k: v for k, v in state.items() if k.role not in (Role.A, Role.B)}

    def fixed(self, state: Tensors) -> Tensors:
        return by_role(state, Role.A, Role.B)

    def export(self, state: Tensors) -> Tensors:
        """Standard LoRA: A' = A, B' = B R (the scaling, 1, is peft's)."""
        out = {k: v for k, v in state.items() if k.role is not Role.R}
        for key in by_role(state, Role.R):
            b_key = partner(key, Role.B)
            out[b_key] = (state[b_key].to(torch.float64) @ state[key].to(torch.float64)).to(state[b_key].dtype)
        return out
