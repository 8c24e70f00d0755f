"""Each client's privacy budget: its plan, its accountant's history, calibration (sample-level DP-SGD).

Client k holds n_k examples. Each round it trains ``T`` steps of DP-SGD on Poisson
batches with sample rate q_k = 1 / ceil(n_k / batch_size) (Opacus's rate for a
loader of that batch size). Its privacy loss is that of the subsampled Gaussian
mechanism composed over its steps, as Opacus's RDP or PRV accountant computes it
from the history (sigma, q, steps).

- ``privacy.epsilon`` set: sigma is calibrated per client so that all the rounds the
  seeded schedule samples it for (``fedlora.federation.schedule``), plus Fed-SB's one-off
  gradient release if it sends one (one step at its Poisson rate), spend at most epsilon.
- A client keeps its history between rounds (in its node state, not in the worker
  process, which may be rebuilt) and refuses any round that would take it above
  epsilon; from then on its data is never used again.
- delta: ``privacy.delta`` or min(1 / (10 n_k), 1e-5); 1 / n_k or more is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from fedlora.config.federated import PrivacyConfig
from fedlora.config.groups import ConfigError

Step = tuple[float, float, int]  # (noise multiplier, sample rate, steps): one entry of an Opacus accountant's history
SIGMA_MAX = 1e4


def client_delta(cfg: PrivacyConfig, num_examples: int) -> float:
    """The client's delta: ``cfg.delta`` or min(1 / (10 n), 1e-5); refuses delta >= 1 / n."""
    return _delta(cfg, num_examples, f"n = 1/{num_examples} for a client with {num_examples} examples",
                  "a record")  # fmt: skip


def _delta(cfg: PrivacyConfig, count: int, what: str, unit: str) -> float:
    """``cfg.delta`` or min(1 / (10 count), 1e-5), refused when not below 1 / count (``count`` records or clients)."""
    delta = cfg.delta if cfg.delta is not None else min(1 / (10 * count), 1e-5)
    if delta >= 1 / count:
        raise ConfigError(f"privacy.delta={delta:g} is not below 1/{what}: it would permit releasing {unit} outright")
    return delta


def epsilon(history: Sequence[Step], delta: float, accountant: str = "rdp", *, all_orders: bool = False) -> float:
    """Epsilon spent by ``history`` at ``delta``, by Opacus's accountant (0 for an empty history).

    RDP is evaluated at the orders 1.25, 1.5, 1.75 and 2..63 (Opacus's default has 90
    fractional orders, about 10x slower to evaluate, and a calibration needs dozens of
    evaluations per client): a valid bound, at most slightly above Opacus's default.
    ``all_orders``: Opacus's default orders (the server's one user-level ledger can afford them).
    """
    if not history:
        return 0.0
    return _epsilon(tuple(compress(history)), delta, accountant, all_orders)


RDP_ORDERS = (1.25, 1.5, 1.75, *range(2, 64))


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[Step, ...], delta: float, accountant: str, all_orders: bool = False) -> float:
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    from opacus.accountants import create_accountant

    acct = create_accountant(mechanism=accountant)
    acct.history = list(history)
    if accountant == "rdp" and all_orders:
        return float(acct.get_epsilon(delta=delta))
    if accountant == "rdp":
        # At the edges of the orders the bound is looser but valid: the smallest order at large epsilon; the
        # largest at the tiny epsilons (huge noise) a calibration passes through on its way to an impossible
        # target, which said so 22 times before its one-line error.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
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
    prior_noise: float | None = None  # each round also releases noised label counts (logit adjustment) at this z
    all_orders: bool = False  # RDP at Opacus's default orders (see :func:`epsilon`)
    init_rate: float = 1.0  # the init release's Poisson rate: its expected share / the client's examples

    @property
    def round_step(self) -> Step:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def init_step(self) -> Step:
        return self.init_step_at(self.init_rate)

    def init_step_at(self, rate: float, sigma: float | None = None) -> Step:
        """Fed-SB's init release as charged: one Gaussian step on a Poisson subsample at ``rate``.

        The subsample takes each record independently with probability ``rate`` (the
        share the server asked for over the client's examples, at most 1), so the
        release is a sampled Gaussian mechanism, accounted as one DP-SGD step is.
        """
        return (self.noise_multiplier if sigma is None else sigma, min(1.0, rate), 1)

    @property
    def round_steps(self) -> list[Step]:
        """What one round charges: its DP-SGD steps, and the noised label counts when there are any."""
        return self._round(self.noise_multiplier)

    def _round(self, sigma: float) -> list[Step]:
        prior = [(self.prior_noise, 1.0, 1)] if self.prior_noise else []  # one record moves one count by 1
        return [(sigma, self.sample_rate, self.steps), *prior]

    def planned(self, noise_multiplier: float | None = None) -> list[Step]:
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        steps = [self.init_step_at(self.init_rate, sigma)] if self.init_release else []
        return steps + self._round(sigma) * self.rounds

    def spent(self, history: Sequence[Step]) -> float:
        return epsilon(history, self.delta, self.accountant, all_orders=self.all_orders)

    def affords(self, history: Sequence[Step], *steps: Step) -> bool:
        """Whether ``steps`` keep the client within its budget (always, with no budget)."""
        return self.budget is None or self.spent([*history, *steps]) <= self.budget


def calibrate(plan: ClientPlan, target: float, *, tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (to ``tolerance`` relative) whose planned spend is <= ``target``."""
    if plan.rounds == 0 and not plan.init_release:
        return 0.0
    lo, hi = 0.0, 1.0
    while plan.spent(plan.planned(hi)) > target:
        lo, hi = hi, 2 * hi
        if hi > SIGMA_MAX:
            raise ConfigError(f"privacy.epsilon={target:g} cannot be met with any noise multiplier below {SIGMA_MAX:g}")
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if plan.spent(plan.planned(mid)) > target:
            lo = mid
        else:
            hi = mid
    return hi


def make_plan(
    cfg: PrivacyConfig,
    *,
    num_examples: int,
    batch_size: int,
    steps: int,
    rounds: int,
    init_release: bool,
    label_prior: bool = False,
    init_share: int | None = None,
) -> ClientPlan:
    """A client's plan: sigma given, or calibrated to ``cfg.epsilon`` over its scheduled rounds (with
    ``label_prior``, each round also releases the label counts noised by ``cfg.label_noise``; with
    ``init_release``, Fed-SB's init gradient over a Poisson subsample of expected size ``init_share``,
    all of its examples when None)."""
    plan = ClientPlan(
        noise_multiplier=cfg.noise_multiplier if cfg.noise_multiplier is not None else 0.0,
        sample_rate=1 / math.ceil(num_examples / batch_size),
        steps=steps,
        rounds=rounds,
        delta=client_delta(cfg, num_examples),
        budget=cfg.epsilon,
        init_release=init_release,
        accountant=cfg.accountant,
        prior_noise=cfg.label_noise if label_prior else None,
        init_rate=1.0 if init_share is None else min(1.0, init_share / num_examples),
    )
    return _settle(plan, cfg, f"a client with {num_examples} examples")


def _settle(plan: ClientPlan, cfg: PrivacyConfig, whom: str) -> ClientPlan:
    """``plan`` with its noise calibrated to ``cfg.epsilon``, or its given noise checked against it."""
    if cfg.noise_multiplier is None:
        return dataclasses.replace(plan, noise_multiplier=calibrate(plan, cfg.epsilon))
    if cfg.epsilon is not None:
        first = [plan.init_step] if plan.init_release else []
        if plan.spent([*first, *plan.round_steps]) > cfg.epsilon:
            raise ConfigError(
                f"privacy.noise_multiplier={cfg.noise_multiplier:g} cannot keep {whom} within "
                f"privacy.epsilon={cfg.epsilon:g} for even one round "
                f"(it would spend {plan.spent([*first, *plan.round_steps]):.3g})"
            )
    return plan


# -- user-level DP (privacy=user): one ledger, the server's ------------------------------------
def user_delta(cfg: PrivacyConfig, clients: int) -> float:
    """delta for a whole client's data: ``cfg.delta`` or min(1 / (10 N), 1e-5); refuses delta >= 1 / N."""
    return _delta(cfg, clients, f"N = 1/{clients} for a federation of {clients} clients", "one client's data")


def user_plan(cfg: PrivacyConfig, *, clients: int, expected: float, rounds: int) -> ClientPlan:
    """The server's plan for user-level DP-FedAvg: one Gaussian release per round at client rate
    q = ``expected`` / ``clients`` (Poisson-sampled cohorts), sigma given or calibrated to
    ``cfg.epsilon`` over ``rounds``; RDP at Opacus's default orders."""
    plan = ClientPlan(
        noise_multiplier=cfg.noise_multiplier if cfg.noise_multiplier is not None else 0.0,
        sample_rate=expected / clients,
        steps=1,
        rounds=rounds,
        delta=user_delta(cfg, clients),
        budget=cfg.epsilon,
        init_release=False,
        accountant=cfg.accountant,
        all_orders=True,
    )
    return _settle(plan, cfg, f"the federation of {clients} clients")
