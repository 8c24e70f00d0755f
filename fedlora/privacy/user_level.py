"""The server's side of user-level DP (``privacy=user``): cohorts, the noisy mean, the clip, the ledger.

The mathematics is :mod:`strategies.user_dp`; this module holds what lasts a run:
the accountant's plan (:func:`fedlora.privacy.accounting.user_plan`, calibrated before round 1),
the rounds charged so far, the adaptive clip bound, and the randomness.

Threat model: central DP. The server is trusted: it sees each sampled client's
update, clips it and adds the noise. The guarantee (epsilon, delta for all of one
client's data) holds for everyone who sees what the server releases: the global
adapter after every round, the exported adapter and the metrics, in which the cohort
sizes, bytes and client losses are therefore left empty (they stay in ``server.log``,
the operator's). Whom the server samples and the noise it adds come from
operating-system entropy, fresh per round (:func:`fedlora.privacy.dp_sgd.private_generator`),
so the run seed does not reveal them; ``privacy.unsafe_seeded_randomness`` derives them
from the seed for tests and marks the run NOT PRIVATE.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from fedlora.config.run import RunConfig
from fedlora.lora import Tensors
from fedlora.privacy.accounting import Step, compress
from fedlora.privacy.budget import user_dp_plan
from fedlora.privacy.dp_sgd import UNSAFE_WARNING, private_generator
from fedlora.seeds import Stream, generator
from strategies import user_dp

log = logging.getLogger(__name__)


class UserLevelDP:
    """One run's user-level DP-FedAvg state; :meth:`round` turns the replies into the strategy's payload."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.plan, self.z_update, self.count_stddev = user_dp_plan(cfg)
        self.expected = float(cfg.sampled_per_round)  # m = q N, the fixed denominator
        self.rate = self.plan.sample_rate
        privacy = cfg.privacy
        self.clip = user_dp.AdaptiveClip(
            bound=privacy.clip_norm,
            quantile=privacy.target_quantile,
            lr=privacy.clip_lr if privacy.adaptive_clip else 0.0,
            count_stddev=self.count_stddev or 0.0,
        )
        # the rounds charged, as run: a resume with more rounds recalibrates z, the past keeps its own
        self.ledger: list[Step] = []
        self.last_bound = privacy.clip_norm  # the bound the last round clipped to
        self.last_fraction: float | None = None
        self._generator: tuple[int, torch.Generator] | None = None  # (round, its generator)

    # -- randomness ---------------------------------------------------------------------------
    def generator(self, server_round: int) -> torch.Generator:
        """The round's generator (cohort, then noise, then the count's noise): private unless unsafe."""
        if self._generator is None or self._generator[0] != server_round:
            if self.cfg.privacy.unsafe_seeded_randomness:
                log.warning(UNSAFE_WARNING)
                rng = generator(Stream.UNSAFE_DP, self.cfg.seed, server_round=server_round)
            else:
                rng = private_generator()
            self._generator = (server_round, rng)
        return self._generator[1]

    def cohort(self, clients: int, server_round: int) -> list[int]:
        """Each of ``clients`` partitions in independently with probability q (Poisson sampling)."""
        draws = torch.rand(clients, generator=self.generator(server_round), dtype=torch.float64)
        return torch.nonzero(draws < self.rate).flatten().tolist()

    # -- the budget ---------------------------------------------------------------------------
    @property
    def step(self) -> Step:
        """One round's release: (z, q, 1)."""
        return (self.plan.noise_multiplier, self.rate, 1)

    @property
    def spent(self) -> float:
        return self.plan.spent(self.ledger)

    def affords_round(self) -> bool:
        """Whether one more round keeps the run within ``privacy.epsilon`` (always, with no budget)."""
        return self.plan.affords(self.ledger, self.step)

    def charge(self) -> None:
        """Record one round's release."""
        self.ledger = compress([*self.ledger, self.step])

    # -- a round ------------------------------------------------------------------------------
    def round(
        self, server_round: int, starts: Sequence[Tensors], payloads: Sequence[Tensors], like: Tensors
    ) -> Tensors:
        """The one payload the strategy aggregates: ``like`` (what every client started from) plus the
        noisy mean of the clipped updates; updates the clip and charges the accountant."""
        rng = self.generator(server_round)
        updates = [user_dp.update_of(p, s) for p, s in zip(payloads, starts, strict=True)]
        mean, norms = user_dp.noisy_mean(
            updates, like, bound=self.clip.bound, noise_std=self.z_update * self.clip.bound,
            expected=self.expected, generator=rng,
        )  # fmt: skip
        median = sorted(norms)[(len(norms) - 1) // 2] if norms else float("nan")
        log.info(
            "round %d: %d update(s), median norm %.3g, clip %.3g", server_round, len(norms), median, self.clip.bound
        )
        self.last_bound = self.clip.bound
        self.last_fraction = self.clip.step(norms, expected=self.expected, generator=rng)
        self.charge()
        return user_dp.apply(like, mean)

    def round_from_secure(self, server_round: int, mean: Any, *, like: Tensors) -> Tensors:
        """:meth:`round` where the clients clipped their updates to ``self.clip.bound`` and a secure aggregation
        gave only their mean (:class:`fedlora.flower.secure.SecureMean`: mean update, the number under the
        bound, how many took part; None: it did not complete, and the release is the noise alone)."""
        rng = self.generator(server_round)
        count, under = (mean.count, mean.under) if mean is not None else (0, 0.0)
        total = (
            {k: t * count for k, t in mean.update.items()}
            if mean is not None
            else {k: 0 * t.double() for k, t in like.items()}
        )
        noised = user_dp.noised_mean(total, noise_std=self.z_update * self.clip.bound, expected=self.expected,
                                     generator=rng)  # fmt: skip
        log.info("round %d: a secure sum of %d clipped update(s), clip %.3g", server_round, count, self.clip.bound,
                 extra={"file_only": True})  # fmt: skip
        self.last_bound = self.clip.bound
        self.last_fraction = self.clip.step_count(under, count, expected=self.expected, generator=rng)
        self.charge()
        return user_dp.apply(like, noised)

    def columns(self) -> dict[str, float | None]:
        """This round's ``outputs.metrics.USER_COLUMNS``: epsilon so far, the clip used, the noisy fraction under it."""
        return {
            "epsilon": self.spent,
            "clip_norm": self.last_bound,
            "clip_fraction": self.last_fraction,
        }

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"ledger": [list(step) for step in self.ledger], "clip": self.clip.bound}

    def restore(self, state: dict[str, Any]) -> None:
        self.ledger = [(float(z), float(q), int(n)) for z, q, n in state["ledger"]]
        self.clip.bound = float(state["clip"])

    def header(self) -> str:
        """The run header's line: what the budget buys, before any training."""
        count = f", clip-count noise {self.count_stddev:.3g}" if self.count_stddev else ""
        planned = self.plan.spent(self.plan.planned())
        return (
            f"user-level DP: q = {self.rate:.4g} (expected cohort {self.expected:g} of {self.cfg.clients}), "
            f"z = {self.plan.noise_multiplier:.4g} (update {self.z_update:.4g}{count}), clip "
            f"{self.clip.bound:g}{' adaptive' if self.clip.lr else ''}, epsilon {planned:.3g} after "
            f"{self.plan.rounds} rounds at delta {self.plan.delta:.3g}"
        )
