"""Intervals for results over seeds: what a table of runs can honestly claim.

Every number a comparison reports over seeds is a mean with a 95% confidence interval from
Student's t distribution (n - 1 degrees of freedom: with 3 seeds the half-width is 4.30 standard
errors, not 1.96), and n. A difference between two methods is read on paired seeds (the same seed
gives both the same partition, cohorts and initialisation), so the interval is of the per-seed
differences. An ordering is stated only when that interval excludes zero; with one seed there is no
interval at all, and :func:`verdict` says so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
TAIL = 5  # rounds a tail mean averages (comparisons give it beside the final round)


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided confidence interval over n values (low = high = mean when n is 1)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def format(self, digits: int = 3, *, scale: float = 1.0) -> str:
        """``0.853 ± 0.012 (n=3)``; ``0.853 (n=1)`` when there is no interval."""
        mean = f"{self.mean * scale:.{digits}f}"
        if self.n < 2:
            return f"{mean} (n={self.n})"
        return f"{mean} ± {self.half_width * scale:.{digits}f} (n={self.n})"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` and its t interval: mean ± t_{(1+c)/2, n-1} s / sqrt(n)."""
    from scipy import stats

    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return Interval(math.nan, math.nan, math.nan, 0, confidence)
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, mean, mean, 1, confidence)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence)


def tail_mean(trained: Sequence[float]) -> float | None:
    """The mean accuracy over the last :data:`TAIL` trained rounds, which averages over the cohorts that move
    a non-IID run's final round; None for a run of fewer than ``2 * TAIL`` rounds (a tail of a short run is
    mostly its climb)."""
    return statistics.mean(trained[-TAIL:]) if len(trained) >= 2 * TAIL else None


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE) -> Interval:
    """A - B on the seeds both have: the t interval of the per-seed differences."""
    seeds = sorted(set(a) & set(b))
    return t_interval([a[s] - b[s] for s in seeds], confidence)


def verdict(name_a: str, name_b: str, diff: Interval, *, what: str = "", scale: float = 100.0) -> str:
    """One sentence a paper could print: ``fed_sb - fedavg at epsilon 1: +0.8 points, 95% CI [-0.4, 2.0],
    3 paired seeds: no difference measurable``."""
    where = f" {what}" if what else ""
    if diff.n == 0:
        return f"{name_a} - {name_b}{where}: no paired seeds"
    head = f"{name_a} - {name_b}{where}: {diff.mean * scale:+.1f} points"
    if diff.n < 2:
        return f"{head}, 1 seed: no interval, no ordering can be stated"
    pct = f"{diff.confidence * 100:g}%"
    ci = f"{pct} CI [{diff.low * scale:+.1f}, {diff.high * scale:+.1f}], {diff.n} paired seeds"
    if not diff.excludes_zero():
        return f"{head}, {ci}: no difference measurable with {diff.n} seeds"
    better = name_a if diff.mean > 0 else name_b
    return f"{head}, {ci}: {better} is ahead"
