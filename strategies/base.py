"""The interface every aggregation strategy implements: pure tensor math, no Flower.

A strategy owns a *state* (a dict of adapter tensors keyed by :class:`AdapterKey`) on the server.
Every process (server and clients) starts from ``initial_state(adapters, generator)`` with the same
seeded generator, so what a strategy draws there (FFA-LoRA's frozen A) is bit-identical everywhere
without being sent. Each round the server broadcasts ``broadcast(state)``, plus ``fixed(state)`` to a
node that does not hold it yet (tensors fixed for the run, such as Fed-SB's A and B); each sampled
client loads them, trains the tensors for which ``trainable(key)`` holds and sends
``payload(adapters)``; the server combines the payloads into a new state with ``aggregate`` (by
default the weighted mean of what the clients sent). ``export(state)`` gives a standard LoRA (A, B
per module) that peft can load. Modules trained in full (``Role.DENSE``, e.g. a task head) travel
with the payload when the run trains them and are averaged with the same weights.

A method's extra steps are declared here and carried out elsewhere, once:
- ``fold(state, payloads, p)``: low-rank factors (A_f, B_f per module) whose product
  s * B_f A_f the server and every client add to W0 (FLoRA, FedEx; the default folds
  nothing); ``fedlora.federation.folding`` keeps nodes that skipped rounds in step.
- ``gradient_init``: a :class:`GradientInit` when the state is initialised from
  base-weight gradients before round 1 (Fed-SB's LoRA-SB), else None;
  ``fedlora.learning.gradient_init`` runs it and calls ``initialise``.
- ``client_rank``: the rank each client trains (FLoRA's heterogeneous ranks;
  ``fedlora.lora.RankMask`` applies it); ``start``: what a client loads at the start
  of a round (FLoRA's fresh adapter); ``personal``: tensors a client trains and keeps
  (FedSA-LoRA's B); ``prepare_model``: changes to the peft model (Fed-SB's R).

Notation per adapted weight W0 (d_out x d_in): dW = s * B A with B (d_out, r), A (r, d_in), s = alpha / r.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedlora.lora import AdapterKey, Role, Tensors
from strategies.server_opt import OPTIMIZERS

# How the server combines one tensor's values from the clients, given their weights p (strategies.robust).
Combine = Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]

WEIGHTINGS = ("examples", "uniform")


@dataclass(frozen=True)
class StrategyConfig:
    """Settings every strategy shares; subclasses add their own fields.

    ``client_lr``: the clients' learning rate this strategy recommends (used when
    ``train.lr`` is null; B-only and R-only training want larger ones); ``client_lr_dp``
    the same under DP-SGD, whose noisy steps want other ones.
    ``weighting``: ``examples`` gives client k the weight p_k = n_k / sum n;
    ``uniform`` gives every replying client 1 / K; None (the configs' default) is
    resolved by the run: ``examples``, or ``uniform`` under DP, where the counts are private.
    """

    name: str
    weighting: str | None = None
    client_lr: float | None = 5e-3  # the clients' learning rate when train.lr is null (this strategy's default)
    client_lr_dp: float | None = None  # the same under privacy=dp (None: client_lr)

    def __post_init__(self) -> None:
        if self.weighting is not None and self.weighting not in WEIGHTINGS:
            raise ValueError(f"strategy.weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")
        for name in ("client_lr", "client_lr_dp"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"strategy.{name} must be > 0, got {value}")


def normalise(weights: Sequence[float]) -> torch.Tensor:
    """Weights -> probabilities p (float64, sum 1). Refuses negative or all-zero weights."""
    p = torch.tensor(weights, dtype=torch.float64)
    if p.ndim != 1 or len(p) == 0:
        raise ValueError("need at least one weight")
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    return p / p.sum()


def weighted_mean(tensors: Sequence[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    """sum_k p_k T_k, accumulated in float64 and returned in the tensors' dtype."""
    stacked = torch.stack([t.to(torch.float64) for t in tensors])
    return torch.tensordot(p, stacked, dims=1).to(tensors[0].dtype)


def same_keys(payloads: Sequence[Tensors]) -> list[AdapterKey]:
    """The keys all payloads share; a reply with other keys is a bug upstream, not noise."""
    if not payloads:
        raise ValueError("aggregate needs at least one payload")
    keys = sorted(payloads[0])
    for i, payload in enumerate(payloads[1:], start=1):
        if sorted(payload) != keys:
            raise ValueError(f"payload {i} holds other tensors than payload 0")
    return keys


def average_payloads(
    state: Tensors,
    payloads: Sequence[Tensors],
    p: torch.Tensor,
    combine: Combine = weighted_mean,
) -> Tensors:
    """The state with every tensor the clients sent replaced by sum_k p_k T_k (or by ``combine``:
    a robust aggregation); the rest unchanged."""
    new = dict(state)
    for key in same_keys(payloads):
        new[key] = combine([payload[key] for payload in payloads], p)
    return new


def stack(payloads: Sequence[Tensors], p: torch.Tensor) -> Tensors:
    """Per module, B = [B_1 | ... | B_K] and A = [p_1 A_1; ...; p_K A_K]: then B A = sum_k p_k B_k A_k.

    Exactly one factor carries p_k. Ranks may differ between clients; the stacked
    rank is the sum of the ranks of the payloads given.
    """
    out: Tensors = {}
    for key in same_keys(payloads):
        if key.role is Role.A:
            out[key] = torch.cat(
                [(pk * pl[key].double()).to(pl[key].dtype) for pk, pl in zip(p, payloads, strict=True)]
            )
        elif key.role is Role.B:
            out[key] = torch.cat([pl[key] for pl in payloads], dim=1)
    return out


def kaiming_a(like: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """A (r, d_in) drawn as peft draws it (kaiming-uniform, a=sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in)))."""
    bound = 1.0 / like.shape[1] ** 0.5
    return (torch.rand(like.shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(like.dtype)


def by_role(tensors: Tensors, *roles: Role) -> Tensors:
    """The tensors whose key has one of ``roles``."""
    return {k: v for k, v in tensors.items() if k.role in roles}


def partner(key: AdapterKey, role: Role) -> AdapterKey:
    """The key of the same module's tensor of ``role`` (B's A, A's B, ...)."""
    return AdapterKey(key.module, role, key.param)


@dataclass(frozen=True)
class GradientInit:
    """A gradient-based initialisation before round 1: base-weight gradients summed over ``samples``
    examples, from the clients sampled for round 0 (``source="clients"``) or a public calibration file."""

    source: str
    samples: int

    @property
    def from_clients(self) -> bool:
        return self.source == "clients"


class Strategy:
    """One federated LoRA method: what clients train and send, how the server combines it."""

    name: ClassVar[str]
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    adapter_roles: ClassVar[frozenset[Role]] = frozenset({Role.A, Role.B})  # the LoRA tensors of a module
    metric_columns: ClassVar[tuple[str, ...]] = ()  # the diagnostics aggregate_report() returns
    # The server optimisers (strategies.server_opt) its server step admits, and why not the others.
    server_optimizers: ClassVar[tuple[str, ...]] = OPTIMIZERS
    server_optimizer_note: ClassVar[str] = ""
    # Whether server.aggregation (a robust mean) applies: everything the server combines is an average.
    robust_aggregation: ClassVar[bool] = True
    robust_note: ClassVar[str] = "it combines the clients' adapters exactly (stacking, exact residual), not by a mean"
    # Whether privacy=user (strategies.user_dp) applies: the server step is an average of the clients'
    # payloads, so a sum of clipped updates has sensitivity C; whether server.secure_aggregation does: it
    # reads them only through their weighted mean, all SecAgg+ reveals; else why not (the notes).
    user_level_dp: ClassVar[bool] = True
    user_dp_note: ClassVar[str] = ""
    secure_aggregation: ClassVar[bool] = True
    secure_note: ClassVar[str] = ""

    def __init__(self, config: StrategyConfig, *, scaling: float) -> None:
        self.config = config
        self.scaling = scaling  # s = alpha / r, the same on every client

    @classmethod
    def lora_alpha(cls, config: StrategyConfig, *, rank: int, alpha: float) -> float:
        """The LoRA alpha this strategy runs with, given ``lora.rank`` and ``lora.alpha``."""
        return alpha

    @classmethod
    def model_rank(cls, config: StrategyConfig, *, rank: int) -> int:
        """The adapter rank the model is built with (FLoRA: the largest client rank)."""
        return rank

    @property
    def gradient_init(self) -> GradientInit | None:
        """How the state is initialised from base-weight gradients before round 1 (LoRA-SB); None: it is not."""
        return None

    def prepare_model(self, model: nn.Module) -> None:
        """Change the freshly built peft model in place (Fed-SB: R between A and B). Default: nothing."""

    # -- client side ---------------------------------------------------------
    def client_rank(self, partition_id: int, *, rank: int) -> int:
        """The rank client ``partition_id`` trains (at most the model's ``rank``). Default: all the same."""
        return rank

    def start(self, received: Tensors, *, like: Tensors, generator: torch.Generator) -> Tensors:
        """What a client loads at the start of a round, given what it received. Default: that.

        ``like`` holds the model's adapter tensors (for shapes); ``generator`` is seeded
        by (run, round, client).
        """
        return received

    def trainable(self, key: AdapterKey) -> bool:
        """Whether clients train (and so send) this LoRA tensor in some round. Default: A and B."""
        return True

    def trains(self, key: AdapterKey, *, server_round: int) -> bool:
        """Whether they train it in ``server_round`` (RoLoRA alternates). Default: ``trainable``."""
        return self.trainable(key)

    def personal(self, key: AdapterKey) -> bool:
        """Whether a client keeps this LoRA tensor to itself between rounds (FedSA-LoRA's B). Default: no."""
        return False

    def payload(self, trained: Tensors) -> Tensors:
        """What a client sends, given the tensors it trained this round. Default: all of them."""
        return dict(trained)

    # -- server side ---------------------------------------------------------
    def initial_state(self, adapters: Tensors, *, generator: torch.Generator) -> Tensors:
        """The round-1 state from the freshly initialised adapter (peft: A random, B = 0)."""
        return dict(adapters)

    def weights(self, num_examples: Sequence[int]) -> torch.Tensor:
        """p_k for the replying clients, by ``config.weighting`` (None counts as ``examples``)."""
        if self.config.weighting == "uniform":
            return normalise([1.0] * len(num_examples))
        return normalise(num_examples)

    def initialise(
        self, state: Tensors, gradients: Tensors, *, lr: float, total_steps: int, generator: torch.Generator
    ) -> Tensors:
        """The round-1 state from summed base-weight gradients (``Role.BASE``); only with a ``gradient_init``."""
        raise NotImplementedError(f"{self.name} has no gradient initialisation")

    def aggregate(
        self,
        state: Tensors,
        payloads: Sequence[Tensors],
        p: torch.Tensor,
        *,
        server_round: int = 1,
        combine: Combine = weighted_mean,
    ) -> Tensors:
        """The next state from the clients' payloads and their normalised weights p.

        Default: every tensor the clients sent replaced by sum_k p_k T_k (exact when the
        other factor is shared: FFA-LoRA's B, Fed-SB's R; FedAvg's inexact mean of A and B).
        ``combine``: what averaging means (the server's ``server.aggregation``: :mod:`strategies.robust`).
        """
        return average_payloads(state, payloads, p, combine)

    def aggregate_report(
        self,
        state: Tensors,
        payloads: Sequence[Tensors],
        p: torch.Tensor,
        *,
        server_round: int = 1,
        combine: Combine = weighted_mean,
    ) -> tuple[Tensors, dict[str, float]]:
        """:meth:`aggregate` and its diagnostics, keyed by ``metric_columns`` (default: none)."""
        return self.aggregate(state, payloads, p, server_round=server_round, combine=combine), {}

    def refine(self, state: Tensors, *, server_round: int = 1) -> tuple[Tensors, dict[AdapterKey, torch.Tensor]]:
        """The state after the server's step on the aggregate, re-parameterised if the method does so
        (FedSVD's refactorisation), and each re-based tensor's change of basis T (X <- X T). Default: as is."""
        return state, {}

    def fold(self, state: Tensors, payloads: Sequence[Tensors], p: torch.Tensor) -> Tensors:
        """Factors (A_f, B_f per module) whose s * B_f A_f joins the base weights after this round.

        Called after ``aggregate`` with its result as ``state``. Default: nothing is folded.
        """
        return {}

    def broadcast(self, state: Tensors) -> Tensors:
        """What every sampled client receives and loads at the start of a round."""
        return state

    def fixed(self, state: Tensors) -> Tensors:
        """Tensors fixed for the rest of the run, sent once to each node (Fed-SB: A, B). Default: none."""
        return {}

    def export(self, state: Tensors) -> Tensors:
        """A standard LoRA (A, B per module, plus dense modules) equal to the global model."""
        return dict(state)
