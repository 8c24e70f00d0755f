"""Limits on what one client can do to the aggregate: weights it cannot inflate, updates it cannot
blow up, and averages it cannot drag (pure tensor math, used by the server on every strategy).

- :func:`cap_counts`: aggregation weights come from what the server knows. A client's
  example count is replaced by the server's own count for its partition where the
  server has one (min of both: an honest client never claims more), and otherwise capped
  at ``ratio`` times the round's lower median count.
- :func:`clip_updates`: each update (payload minus what that client started from, L2 over
  all its tensors) is scaled down to at most ``factor`` times the round's lower median
  update norm. The lower median is an honest client's norm whenever honest clients are
  a majority (with two clients: the smaller one), so the bound needs no tuning.
- :func:`combiner`: the coordinate-wise trimmed mean or median that replaces the weighted
  mean in whatever a strategy averages (``server.aggregation``). Both are unweighted:
  weights are what an attacker would inflate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedlora.lora import Tensors
from strategies.base import Combine, weighted_mean

AGGREGATIONS = ("mean", "trimmed_mean", "median")


def lower_median(values: Sequence[float]) -> float:
    """The ceil(n/2)-th smallest value (the smaller middle one when n is even)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def cap_counts(counts: Sequence[int], known: Sequence[int | None], *, ratio: float) -> list[int]:
    """Each count limited by the server's own (where ``known`` has one), else by ``ratio`` x the lower median."""
    capped = [c if k is None else min(c, k) for c, k in zip(counts, known, strict=True)]
    bound = ratio * lower_median(capped)
    return [c if k is not None else max(1, min(c, math.floor(bound))) for c, k in zip(capped, known, strict=True)]


def update_norm(payload: Tensors, start: Tensors) -> float:
    """sqrt(sum over tensors of ||payload - start||_F^2), in float64."""
    return math.sqrt(sum(float((payload[k].double() - start[k].double()).square().sum()) for k in start))


def clip_updates(
    payloads: Sequence[Tensors], starts: Sequence[Tensors], *, factor: float
) -> tuple[list[Tensors], list[float], float]:
    """(payloads with each update scaled to norm <= factor x the lower median norm, the norms, the bound)."""
    norms = [update_norm(p, s) for p, s in zip(payloads, starts, strict=True)]
    bound = factor * lower_median(norms)
    out = []
    for payload, start, norm in zip(payloads, starts, norms, strict=True):
        if norm <= bound:
            out.append(payload)
            continue
        scale = bound / norm
        out.append({k: (start[k].double() + scale * (v.double() - start[k].double())).to(v.dtype)
                    for k, v in payload.items()})  # fmt: skip
    return out, norms, bound


def trimmed_mean(trim: float) -> Combine:
    """Per coordinate: drop the floor(trim * K) smallest and largest of the K values, average the rest."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"the trim fraction must be in [0, 0.5), got {trim}")

    def combine(tensors: Sequence[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
        values = torch.stack([t.to(torch.float64) for t in tensors]).sort(dim=0).values
        cut = math.floor(trim * len(tensors))
        return values[cut : len(tensors) - cut].mean(dim=0).to(tensors[0].dtype)

    return combine


def median(tensors: Sequence[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    """Per coordinate: the median of the K values (the mean of the middle two when K is even)."""
    values = torch.stack([t.to(torch.float64) for t in tensors]).sort(dim=0).values
    k = len(tensors)
    middle = values[(k - 1) // 2 : k // 2 + 1]
    return middle.mean(dim=0).to(tensors[0].dtype)


def combiner(aggregation: str, *, trim: float = 0.2) -> Combine:
    """The per-tensor combination for ``server.aggregation`` (mean: the strategy's weighted mean)."""
    if aggregation == "mean":
        return weighted_mean
    if aggregation == "trimmed_mean":
        return trimmed_mean(trim)
    if aggregation == "median":
        return median
    raise ValueError(f"unknown server.aggregation {aggregation!r}; choose from {list(AGGREGATIONS)}")
