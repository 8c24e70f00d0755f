"""What a round's accepted replies weigh: no client outweighs the rest (:mod:`strategies.robust`).

A reply that passed its checks is a :class:`Checked`; :func:`bounded` scales down an update far above
the round's median norm (``server.update_clip``), leaves out the updates farthest from the rest
(``server.multi_krum``) and caps a claimed example count against the
server's own table (``server.max_weight_ratio``), then gives the strategy's normalised weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fedlora.config.run import RunConfig
from fedlora.lora import Tensors
from strategies import Strategy, robust

log = logging.getLogger(__name__)


@dataclass
class Checked:
    """A reply that may be aggregated: its tensors, what that client started from, its count and loss."""

    payload: Tensors
    start: Tensors
    count: int  # examples as it claims them (1 when weighting uniformly)
    loss: float | None  # None when the client does not report one (DP clients never do)


def bounded(
    accepted: list[tuple[int, Checked]],
    strategy: Strategy,
    cfg: RunConfig,
    *,
    known_sizes: dict[int, int],
    server_round: int,
) -> tuple[list[Tensors], torch.Tensor, list[float | None]]:
    """(payloads, weights p, losses) with no client outweighing the rest (:mod:`strategies.robust`)."""
    pids = [pid for pid, _ in accepted]
    checked = [c for _, c in accepted]
    payloads = [c.payload for c in checked]
    server = cfg.server
    if server.update_clip is not None:
        starts = [c.start for c in checked]
        payloads, norms, bound = robust.clip_updates(payloads, starts, factor=server.update_clip)
        for pid, norm in zip(pids, norms, strict=True):
            if norm > bound:
                log.warning(
                    "round %d: partition %d's update norm %.4g scaled down to %.4g (server.update_clip=%g x "
                    "the round's median)", server_round, pid, norm, bound, server.update_clip,
                )  # fmt: skip
    drop = robust.krum_drops(len(payloads), server.multi_krum or 0.0)
    if drop:
        kept = robust.multi_krum(payloads, [c.start for c in checked], drop=drop)
        left_out = [pid for i, pid in enumerate(pids) if i not in kept]
        log.info("round %d: Multi-Krum left out partition(s) %s, the farthest from the rest (server.multi_krum=%g)",
                 server_round, left_out, server.multi_krum, extra={"file_only": True})  # fmt: skip
        pids, checked, payloads = ([xs[i] for i in kept] for xs in (pids, checked, payloads))
    counts = [c.count for c in checked]
    if cfg.strategy.weighting == "examples":
        known = [known_sizes.get(pid) for pid in pids]
        capped = robust.cap_counts(counts, known, ratio=server.max_weight_ratio)
        noised = cfg.privacy.enabled and not cfg.privacy.public_counts  # counts off by the DP noise
        for pid, claimed, used in zip(pids, counts, capped, strict=True):
            if used < claimed:
                log.log(logging.DEBUG if noised else logging.WARNING,
                        "round %d: partition %d claims %d examples; weighted as %d", server_round, pid,
                        claimed, used)  # fmt: skip
        counts = capped
    return payloads, strategy.weights(counts), [c.loss for c in checked]
