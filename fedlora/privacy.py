"""Client-side DP-SGD with Opacus: a plan per client, its accountant's history, the budget.

Client k holds n_k examples. Each round it trains ``T`` steps of DP-SGD on Poisson
batches with sample rate q_k = 1 / ceil(n_k / batch_size) (Opacus's rate for a
loader of that batch size), per-sample gradients of the trainable tensors clipped
to C = ``max_grad_norm`` in total and Gaussian noise of std sigma C. Its privacy
loss is that of the subsampled Gaussian mechanism composed over its steps, as
Opacus's RDP or PRV accountant computes it from the history (sigma, q, steps).

- ``privacy.epsilon`` set: sigma is calibrated per client so that all the rounds the
  seeded schedule samples it for (``fedlora.schedule``), plus Fed-SB's one-off
  gradient release if it sends one, spend at most epsilon.
- A client keeps its history between rounds (in its node state, not in the worker
  process, which may be rebuilt) and refuses any round that would take it above
  epsilon; from then on its data is never used again.
- delta: ``privacy.delta`` or min(1 / (10 n_k), 1e-5); 1 / n_k or more is refused.

Fed-SB's LoRA-SB gradient (round 0) is a release too: the examples are a Poisson
subsample of the client's data (each record in independently, so adding or
removing one record changes one term of the sum), each example's gradient of the
base weights is clipped to C, the sum gets N(0, sigma^2 C^2) noise, and it is
charged as one step at rate 1 (no subsampling amplification is claimed).

Randomness. Everything the guarantee rests on (the noise, the Poisson batch masks,
the init subsample) comes from :func:`private_generator`: a torch generator seeded
from 64 bits of operating-system entropy in the client process, fresh for every
release, so that neither the server nor other clients can regenerate it from the run
seed. It is not a cryptographic generator: Opacus's ``secure_mode`` needs
``torchcsprng``, which has no build for torch 2.x, so floating-point attacks on the
Gaussian sampler (Mironov 2012) are out of scope. ``privacy.unsafe_seeded_randomness``
derives the same draws from the run seed instead (:func:`dp_generator`), for tests
and benchmarks that must compare runs; such runs are not private and say so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import secrets
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedlora.config import ConfigError, PrivacyConfig

log = logging.getLogger(__name__)

Step = tuple[float, float, int]  # (noise multiplier, sample rate, steps): one entry of an Opacus accountant's history
SIGMA_MAX = 1e4


UNSAFE_WARNING = (
    "privacy.unsafe_seeded_randomness=true: the DP noise and sampling are derived from the run seed, so anyone "
    "who knows the run's config can remove the noise. This run is NOT PRIVATE; use it for tests only."
)


NOT_PRIVATE_COLUMN = "privacy_warning"  # metrics.csv's column on runs with seeded DP randomness
NOT_PRIVATE = "NOT PRIVATE: privacy.unsafe_seeded_randomness"


def private_generator() -> torch.Generator:
    """A generator seeded from 64 bits of OS entropy (``secrets``): nobody else can reproduce its draws.

    The seed is never stored or sent. One per release, so no two releases share a stream.
    """
    return torch.Generator().manual_seed(secrets.randbits(64))


def dp_generator(cfg: PrivacyConfig, seed: int) -> torch.Generator:
    """The generator of one DP release: private, or (``unsafe_seeded_randomness``) seeded by ``seed``.

    ``seed`` is the release's seed derived from the run seed; it is used only when the
    user switched the protection off, and every such use logs :data:`UNSAFE_WARNING`.
    """
    if not cfg.unsafe_seeded_randomness:
        return private_generator()
    log.warning(UNSAFE_WARNING)
    return torch.Generator().manual_seed(seed)


def client_delta(cfg: PrivacyConfig, num_examples: int) -> float:
    """The client's delta: ``cfg.delta`` or min(1 / (10 n), 1e-5); refuses delta >= 1 / n."""
    delta = cfg.delta if cfg.delta is not None else min(1 / (10 * num_examples), 1e-5)
    if delta >= 1 / num_examples:
        raise ConfigError(
            f"privacy.delta={delta:g} is not below 1/n = 1/{num_examples} for a client with {num_examples} "
            "examples: it would permit releasing a record outright"
        )
    return delta


def epsilon(history: Sequence[Step], delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by ``history`` at ``delta``, by Opacus's accountant (0 for an empty history).

    RDP is evaluated at the orders 1.25, 1.5, 1.75 and 2..63 (Opacus's default has 90
    fractional orders, about 10x slower to evaluate, and a calibration needs dozens of
    evaluations per client): a valid bound, at most slightly above Opacus's default.
    """
    if not history:
        return 0.0
    return _epsilon(tuple(compress(history)), delta, accountant)


RDP_ORDERS = (1.25, 1.5, 1.75, *range(2, 64))


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[Step, ...], delta: float, accountant: str) -> float:
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    from opacus.accountants import create_accountant

    acct = create_accountant(mechanism=accountant)
    acct.history = list(history)
    if accountant == "rdp":
        with warnings.catch_warnings():  # at large epsilon the best order is the smallest: a looser, valid bound
            warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
            return float(acct.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))
    return float(acct.get_epsilon(delta=delta))


def compress(history: Sequence[Step]) -> list[Step]:
    """Consecutive steps of equal (sigma, q) merged into one entry: the same composition, fewer terms."""
    out: list[Step] = []
    for sigma, rate, steps in history:
        if out and out[-1][:2] == (sigma, rate):
            out[-1] = (sigma, rate, out[-1][2] + int(steps))
        else:
            out.append((float(sigma), float(rate), int(steps)))
    return out


@dataclass(frozen=True)
class ClientPlan:
    """What one client's DP-SGD does each round, and what its whole run may spend."""

    noise_multiplier: float
    sample_rate: float
    steps: int  # DP-SGD steps per round
    rounds: int  # rounds the schedule samples it for
    delta: float
    budget: float | None  # epsilon; None: no budget, spend only reported
    init_release: bool  # it sends Fed-SB's noised init gradient before round 1
    accountant: str = "rdp"

    @property
    def round_step(self) -> Step:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def init_step(self) -> Step:
        return (self.noise_multiplier, 1.0, 1)

    def planned(self, noise_multiplier: float | None = None) -> list[Step]:
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        steps = [(sigma, 1.0, 1)] if self.init_release else []
        return steps + [(sigma, self.sample_rate, self.steps)] * self.rounds

    def spent(self, history: Sequence[Step]) -> float:
        return epsilon(history, self.delta, self.accountant)

    def affords(self, history: Sequence[Step], step: Step) -> bool:
        """Whether ``step`` keeps the client within its budget (always, with no budget)."""
        return self.budget is None or self.spent([*history, step]) <= self.budget


def calibrate(plan: ClientPlan, target: float, *, tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (to ``tolerance`` relative) whose planned spend is <= ``target``."""
    if plan.rounds == 0 and not plan.init_release:
        return 0.0
    lo, hi = 0.0, 1.0
    while epsilon(plan.planned(hi), plan.delta, plan.accountant) > target:
        lo, hi = hi, 2 * hi
        if hi > SIGMA_MAX:
            raise ConfigError(f"privacy.epsilon={target:g} cannot be met with any noise multiplier below {SIGMA_MAX:g}")
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if epsilon(plan.planned(mid), plan.delta, plan.accountant) > target:
            lo = mid
        else:
            hi = mid
    return hi


def make_plan(
    cfg: PrivacyConfig, *, num_examples: int, batch_size: int, steps: int, rounds: int, init_release: bool
) -> ClientPlan:
    """A client's plan: sigma given, or calibrated to ``cfg.epsilon`` over its scheduled rounds."""
    plan = ClientPlan(
        noise_multiplier=cfg.noise_multiplier if cfg.noise_multiplier is not None else 0.0,
        sample_rate=1 / math.ceil(num_examples / batch_size),
        steps=steps,
        rounds=rounds,
        delta=client_delta(cfg, num_examples),
        budget=cfg.epsilon,
        init_release=init_release,
        accountant=cfg.accountant,
    )
    if cfg.noise_multiplier is None:
        return dataclasses.replace(plan, noise_multiplier=calibrate(plan, cfg.epsilon))
    if cfg.epsilon is not None:
        first = [plan.init_step] if init_release else []
        if plan.spent([*first, plan.round_step]) > cfg.epsilon:
            raise ConfigError(
                f"privacy.noise_multiplier={cfg.noise_multiplier:g} cannot keep a client with {num_examples} "
                f"examples within privacy.epsilon={cfg.epsilon:g} for even one round "
                f"(it would spend {plan.spent([*first, plan.round_step]):.3g})"
            )
    return plan


@contextmanager
def dp_sgd(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: torch.utils.data.DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str,
    criterion: nn.Module,
    generator: torch.Generator,
    poisson: bool = True,
) -> Iterator[tuple[nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader, Any]]:
    """Opacus around one round: (private model, DP optimizer, Poisson loader, criterion).

    ``generator`` draws the noise and the Poisson masks (:func:`dp_generator`); the
    loader of ``batches`` gives the dataset, batch size (expected batch under Poisson
    sampling: rate 1 / len(batches)) and collate function. ``poisson=False`` keeps
    ``batches`` as they are: only for tests that need fixed batches, since the
    accounting assumes Poisson sampling (the config refuses it under DP).
    The model is put in train mode first (Opacus finds no activations in eval mode).
    Ghost clipping returns a wrapped criterion whose ``backward`` runs both passes;
    the other modes return ``criterion`` unchanged. Opacus's hooks are removed on
    exit, so the worker's cached model is a plain peft model again.
    """
    from opacus import PrivacyEngine

    model.train()
    if poisson:  # Opacus draws the Poisson masks from the loader's generator: make it ours
        batches = torch.utils.data.DataLoader(
            batches.dataset, batch_size=batches.batch_size, collate_fn=batches.collate_fn, generator=generator
        )
    with warnings.catch_warnings():
        # Expected, so silenced: Opacus asks transformers a deprecated question; full backward
        # hooks fire on the outputs of modules whose inputs need no grad (the frozen embeddings
        # feed the first LoRA). Opacus's "Secure RNG turned off" warning is left on: it is true.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine()  # its accountant is unused: clients keep their own history
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=batches,
            criterion=criterion,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=poisson,
            grad_sample_mode=grad_sample_mode,
            noise_generator=generator,
        )
        private, dp_optimizer, *rest = made
        private_criterion = rest[0] if len(rest) == 2 else criterion
        try:
            yield private, dp_optimizer, rest[-1], private_criterion
        finally:
            private._close()


def poisson_subsample(num_examples: int, rate: float, *, generator: torch.Generator) -> list[int]:
    """Indices of a Poisson subsample: each of ``num_examples`` records is in with probability ``rate``.

    Each record's inclusion is independent of the others, so adding or removing one
    record changes at most one term of a sum over the subsample (sensitivity C after
    clipping), unlike the first rows of a shuffle, which all move when a record is added.
    """
    return torch.nonzero(torch.rand(num_examples, generator=generator) < rate).flatten().tolist()


def clip_and_noise(
    per_example: Iterator[dict[Any, torch.Tensor]],
    zeros: dict[Any, torch.Tensor],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[dict[Any, torch.Tensor], int]:
    """Sum of per-example gradients, each clipped to ``max_grad_norm`` in total norm, plus N(0, (sigma C)^2) noise.

    ``zeros`` gives every key and shape of the sum (an empty subsample still gets its
    noise). Written out rather than through Opacus because it is a one-off over frozen
    base weights (Fed-SB's init), where one example at a time is simple and obviously right.
    """
    total = {key: z.clone() for key, z in zeros.items()}
    count = 0
    for grads in per_example:  # computes gradients: not under no_grad
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads.values()))
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-12))
        for key, g in grads.items():
            total[key] += factor * g
        count += 1
    for key, value in total.items():
        total[key] = value + gaussian_noise(value, std=noise_multiplier * max_grad_norm, generator=generator)
    return total, count


def gaussian_noise(like: torch.Tensor, *, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise shaped as ``like``, drawn from ``generator``."""
    return std * torch.randn(like.shape, generator=generator, dtype=like.dtype)
