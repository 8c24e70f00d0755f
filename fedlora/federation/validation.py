"""Checks on a client's reply before it may enter the aggregate.

A deployment's clients are other people's machines: a reply may come from a bug,
a flipped bit or an attacker. The server knows what each client must send (the
keys, shapes and dtypes its strategy, rank and trainable set give) and what it started
from, so it can refuse a reply that does not fit, that holds NaN or Inf, or whose
change is larger than ``server.max_update_norm``.
"""

from __future__ import annotations

import torch

from fedlora.lora import Tensors
from strategies.robust import update_norm


def reject_reason(payload: Tensors, expected: Tensors, *, max_norm: float | None = None) -> str | None:
    """Why ``payload`` must be left out, or None when it is acceptable.

    ``expected``: the tensors the client started from, keyed and shaped as its payload
    must be; the change ``payload - expected`` (L2 over all tensors) is bounded by ``max_norm``.
    """
    missing = sorted(map(str, expected.keys() - payload.keys()))
    if missing:
        return f"missing {len(missing)} tensor(s), e.g. {missing[0]}"
    extra = sorted(map(str, payload.keys() - expected.keys()))
    if extra:
        return f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}"
    for key in sorted(expected):
        got, want = payload[key], expected[key]
        if tuple(got.shape) != tuple(want.shape):
            return f"{key} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if got.dtype != want.dtype:  # a client never decides the server's dtype (its state, its checkpoint)
            return f"{key} has dtype {got.dtype}, expected {want.dtype}"
        if not torch.isfinite(got).all():
            return f"{key} holds NaN or Inf"
    if max_norm is not None:
        norm = update_norm(payload, expected)
        if not norm <= max_norm:
            return f"update norm {norm:.4g} exceeds server.max_update_norm={max_norm:g}"
    return None
