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
- :func:`multi_krum`: Multi-Krum (Blanchard et al., NeurIPS 2017) leaves out the f updates farthest
  from the others (each scored by its squared distances to its n - f - 2 nearest neighbours), so
  an update pointing anywhere but where the honest ones point is dropped, not averaged in: with
  one attacker in five the aggregate is the four honest clients' (what leaving it out gives).
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


def krum_drops(n: int, fraction: float) -> int:
    """How many of n updates Multi-Krum leaves out: floor(fraction x n), at most what Krum's scores allow
    (n >= 2f + 3); 0 for fewer than five updates."""
    return max(0, min(math.floor(fraction * n + 1e-9), (n - 3) // 2))


def _deltas(key: str, payloads: Sequence[Tensors], starts: Sequence[Tensors]) -> torch.Tensor:
    """(n, size) float64: each client's change of tensor ``key``, zero-padded to the largest shape (ranks
    may differ)."""
    deltas = [p[key].double() - s[key].double() for p, s in zip(payloads, starts, strict=True)]
    shape = tuple(max(dims) for dims in zip(*(d.shape for d in deltas), strict=True))
    out = deltas[0].new_zeros((len(deltas), *shape))
    for i, d in enumerate(deltas):
        out[(i, *(slice(0, k) for k in d.shape))] = d
    return out.flatten(1)


def multi_krum(payloads: Sequence[Tensors], starts: Sequence[Tensors], *, drop: int) -> list[int]:
    """The indices (ascending) of the n - drop updates Multi-Krum keeps.

    Update i's score is the sum of its squared L2 distances to its n - drop - 2 nearest other updates;
    the ``drop`` highest scores are left out (ties: the later index). Updates whose tensors differ in
    shape (heterogeneous ranks) are compared zero-padded to the largest, as HetLoRA pads them."""
    n = len(payloads)
    if drop <= 0:
        return list(range(n))
    if n < 2 * drop + 3:
        raise ValueError(f"Multi-Krum needs n >= 2f + 3 updates, got n={n}, f={drop}")
    gram = torch.zeros(n, n, dtype=torch.float64)
    for key in sorted(payloads[0]):  # one tensor at a time: never all n updates flattened at once
        d = _deltas(key, payloads, starts)
        gram += d @ d.T
    squared = gram.diagonal()
    distances = (squared[:, None] + squared[None, :] - 2 * gram).clamp(min=0)
    distances.fill_diagonal_(float("inf"))
    scores = distances.sort(dim=1).values[:, : n - drop - 2].sum(dim=1)
    ranked = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return sorted(ranked[: n - drop])


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
