"""User-level DP-FedAvg (McMahan et al., ICLR 2018) with adaptive clipping (Andrew et al., NeurIPS 2021).

Pure tensor math; the server (``fedlora.flower.rounds``) samples the cohort, calls
these functions and charges the accountant (``fedlora.privacy.accounting.user_plan``).

One round, for a cohort in which each of N clients took part independently with
probability q (expected size m = q N):

- client k's update is Delta_k = (what it sent) - (what it started from), over every
  tensor the strategy averages (the head included), flattened into one vector;
- it is clipped to norm C: Delta_k min(1, C / ||Delta_k||);
- the server adds N(0, (z_Delta C)^2) once to the sum of clipped updates and divides
  by m, a fixed denominator (not by the number that replied): adding or removing one
  client moves the sum by at most C, whatever the others do;
- the new average is (what they started from) + that noisy mean; whatever the
  strategy does after it (a server optimiser, FedSVD's refactorisation) only
  post-processes it.

Adaptive clipping: each client's bit b_k = 1[||Delta_k|| <= C] is summed, centred
(b_k - 1/2, sensitivity 1/2), with N(0, sigma_b^2) noise; b = noisy sum / m + 1/2 estimates
the fraction of updates under the clip, and C <- C exp(-eta (b - gamma)) moves C towards
the gamma-quantile of the update norms. Both releases together are one Gaussian
mechanism of noise multiplier z with z^-2 = z_Delta^-2 + (2 sigma_b)^-2 (Andrew et al.,
Thm. 1), which is what the accountant is charged: :func:`update_noise_multiplier`
splits a calibrated z into the update's share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.lora import Tensors


def update_of(payload: Tensors, start: Tensors) -> Tensors:
    """Delta = payload - start, per tensor the client sent (float64)."""
    return {key: payload[key].double() - start[key].double() for key in sorted(payload)}


def norm(update: Tensors) -> float:
    """The L2 norm of all of ``update``'s tensors together."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in update.values()))


def clip(update: Tensors, bound: float) -> tuple[Tensors, float]:
    """``update`` scaled to norm at most ``bound`` (unchanged below it), and its norm before."""
    size = norm(update)
    factor = min(1.0, bound / size) if size > 0 else 1.0
    return {key: t * factor for key, t in update.items()}, size


def noisy_mean(
    updates: Sequence[Tensors],
    like: Tensors,
    *,
    bound: float,
    noise_std: float,
    expected: float,
    generator: torch.Generator,
) -> tuple[Tensors, list[float]]:
    """(sum_k clip(Delta_k, bound) + N(0, noise_std^2 I)) / expected, and the norms before clipping.

    ``like`` gives the keys and shapes (an empty cohort still gets its noise); the
    noise is added once, to the sum, in float64.
    """
    if expected <= 0:
        raise ValueError(f"the expected cohort size must be > 0, got {expected}")
    total = {key: torch.zeros(t.shape, dtype=torch.float64) for key, t in sorted(like.items())}
    norms = []
    for update in updates:
        if sorted(update) != sorted(total):
            raise ValueError("an update holds other tensors than the state it is added to")
        clipped, size = clip(update, bound)
        norms.append(size)
        for key, t in clipped.items():
            total[key] += t
    return noised_mean(total, noise_std=noise_std, expected=expected, generator=generator), norms


def noised_mean(total: Tensors, *, noise_std: float, expected: float, generator: torch.Generator) -> Tensors:
    """(``total`` + N(0, noise_std^2 I)) / expected, in float64: the release from a sum of clipped updates
    (:func:`noisy_mean`'s, or one a secure aggregation unmasked)."""
    if expected <= 0:
        raise ValueError(f"the expected cohort size must be > 0, got {expected}")
    out = {}
    for key, t in sorted(total.items()):
        noise = noise_std * torch.randn(t.shape, generator=generator, dtype=torch.float64)
        out[key] = (t.double() + noise) / expected
    return out


def apply(start: Tensors, mean_update: Tensors) -> Tensors:
    """``start`` moved by ``mean_update`` (in ``start``'s dtypes): the one payload the strategy then aggregates."""
    return {key: (start[key].double() + mean_update[key]).to(start[key].dtype) for key in mean_update}


def update_noise_multiplier(total: float, count_stddev: float | None) -> float:
    """z_Delta with z_Delta^-2 + (2 sigma_b)^-2 = z^-2 (``count_stddev`` None: no count released, z_Delta = z).

    Refuses a sigma_b too small to leave the update any share of the budget (2 sigma_b <= z).
    """
    if count_stddev is None or total == 0:
        return total
    if 2 * count_stddev <= total:
        raise ValueError(
            f"the clip count's noise sigma_b={count_stddev:g} must exceed z/2={total / 2:g} (z the run's noise "
            "multiplier); raise privacy.clip_count_stddev"
        )
    return (total**-2 - (2 * count_stddev) ** -2) ** -0.5


def default_count_stddev(expected: float, total: float) -> float:
    """sigma_b: Andrew et al.'s m / 20, raised to z where that is smaller (then the count takes 1/4 of
    the budget's precision and the update's noise grows by at most 1 / sqrt(3/4) = 1.155x)."""
    return max(expected / 20, total)


@dataclass
class AdaptiveClip:
    """The clip bound C and its geometric update towards the ``quantile`` of the update norms."""

    bound: float
    quantile: float = 0.5
    lr: float = 0.2
    count_stddev: float = 0.0  # sigma_b: the noise on the centred count of clients under the bound

    def step(self, norms: Sequence[float], *, expected: float, generator: torch.Generator) -> float:
        """Update C from this round's norms (measured against the current C); returns b, the noisy
        fraction under it."""
        return self.step_count(sum(1 for n in norms if n <= self.bound), len(norms), expected=expected,
                               generator=generator)  # fmt: skip

    def step_count(self, under: float, count: int, *, expected: float, generator: torch.Generator) -> float:
        """:meth:`step` from the number of ``count`` updates that were under the bound (a secure sum of bits)."""
        centred = under - 0.5 * count
        noise = self.count_stddev * float(torch.randn((), generator=generator, dtype=torch.float64))
        below = (centred + noise) / expected + 0.5
        self.bound *= math.exp(-self.lr * (below - self.quantile))
        return below
