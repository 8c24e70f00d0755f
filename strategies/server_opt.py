"""Server optimisers on the aggregated update (Reddi et al., "Adaptive Federated Optimization", ICLR 2021;
FedAvgM: Hsu et al., 2019). Pure tensor math, like the strategies.

Each round the strategy's ``aggregate`` gives the target x* of what it averages (A and B
for FedAvg, B for FFA-LoRA, R for Fed-SB, LoRA-FAIR's corrected B, FedSVD's B_bar before
its refactorisation, a trained head everywhere). With x the current state, the
aggregated update (pseudo-gradient, negated) is Delta = x* - x, and the server steps

    none:      x <- x*                                          (no optimiser: FedAvg)
    momentum:  m <- beta m + Delta;                 x <- x + lr m            (FedAvgM)
    adam:      m <- b1 m + (1 - b1) Delta;  v <- b2 v + (1 - b2) Delta^2;
               x <- x + lr m / (sqrt(v) + tau)                               (FedAdam)
    yogi:      v <- v - (1 - b2) Delta^2 sign(v - Delta^2)                   (FedYogi)
    adagrad:   v <- v + Delta^2                                              (FedAdagrad)

element-wise, m and v starting at 0 and without bias correction, as in the paper's
Algorithm 2 (and Flower's FedOpt strategies). With lr 1 and ``momentum`` 0, momentum
is x*; ``none`` returns x* itself, bit for bit.

A strategy that re-parameterises its state after the step (FedSVD's refactorisation:
B <- B T for an r x r T per module) passes the change of basis to :meth:`rebase`: the
momentum buffer m (an update in B's coordinates) moves with it, m <- m T, so that
m A is the same update in weight space. Element-wise second moments have no such
change of basis, so such a strategy refuses the adaptive optimisers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fedlora.lora import AdapterKey, Tensors

OPTIMIZERS = ("none", "momentum", "adam", "yogi", "adagrad")
ADAPTIVE = ("adam", "yogi", "adagrad")


@dataclass(frozen=True)
class ServerOptConfig:
    """``optimizer`` and its settings; ``lr`` None: 1 for none and momentum, 0.01 for the adaptive ones."""

    optimizer: str = "none"
    lr: float | None = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"server.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"server.lr must be > 0, got {self.lr}")
        for name in ("momentum", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"server.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.tau <= 0:
            raise ValueError(f"server.tau must be > 0, got {self.tau}")

    @property
    def step_size(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.01 if self.optimizer in ADAPTIVE else 1.0


class ServerOptimizer:
    """The server's step on the aggregated update; its moments (float64) are kept per tensor."""

    def __init__(self, config: ServerOptConfig) -> None:
        self.config = config
        self.m: Tensors = {}
        self.v: Tensors = {}

    def step(self, state: Tensors, target: Tensors, keys: Iterable[AdapterKey]) -> Tensors:
        """``target`` with each of ``keys`` replaced by the optimiser's step from ``state`` towards it."""
        cfg = self.config
        if cfg.optimizer == "none":
            return target
        out = dict(target)
        lr = cfg.step_size
        for key in sorted(keys):
            x = state[key].double()
            delta = target[key].double() - x
            m = self.m.get(key, torch.zeros_like(delta))
            if cfg.optimizer == "momentum":
                m = cfg.momentum * m + delta
                update = m
            else:
                m = cfg.beta1 * m + (1 - cfg.beta1) * delta
                v = self.v.get(key, torch.zeros_like(delta))
                square = delta.square()
                if cfg.optimizer == "adam":
                    v = cfg.beta2 * v + (1 - cfg.beta2) * square
                elif cfg.optimizer == "yogi":
                    v = v - (1 - cfg.beta2) * square * torch.sign(v - square)
                else:  # adagrad
                    v = v + square
                self.v[key] = v
                update = m / (v.sqrt() + cfg.tau)
            self.m[key] = m
            out[key] = (x + lr * update).to(target[key].dtype)
        return out

    def rebase(self, changes: dict[AdapterKey, torch.Tensor]) -> None:
        """Move the momentum of tensors re-parameterised as X <- X T (T: (r, r)) to the new coordinates."""
        for key, t in changes.items():
            if key in self.m:
                self.m[key] = self.m[key] @ t.double()
            if key in self.v:
                raise ValueError(f"{key}: an element-wise second moment has no change of basis")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The moments, for a checkpoint (``m|<key>``, ``v|<key>``)."""
        return {f"m|{k}": t for k, t in self.m.items()} | {f"v|{k}": t for k, t in self.v.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            which, key = name.split("|", 1)
            (self.m if which == "m" else self.v)[AdapterKey.parse(key)] = t.double()
