"""The client's side of secure aggregation (``server.secure_aggregation=secaggplus``): Flower's
``secaggplus_mod`` runs the protocol; what it masks is built here.

A round's training message carries Flower's SecAgg+ stage record; every other message goes
to the ClientApp untouched. At Flower's "collect masked vectors" stage the mod calls the
ClientApp, whose reply (:func:`fedlora.flower.client_app.train`) holds the client's update
Delta = payload - start (clipped to the server's bound under ``privacy=user``); here it
becomes the one vector Flower quantises and masks:

    [Delta's tensors in key order..., [train loss / LOSS_SCALE, under-clip bit]]

with the client's weight (the server's table, its own count at most ``max-weight``, or 1)
as Flower's ``num_examples``: the server unmasks sum_k w_k x_k / sum_k w_k, so the weighted
mean update and the weighted mean training loss, and nothing of one client. What stays in
the clear is what the server needs to run the round and no client's data: the partition id,
the round's nonce, a DP client's ledger and epsilon, where a simulated client ran.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fedlora.flower import records
from fedlora.lora import Tensors
from strategies import user_dp

LOSS_SCALE = 64.0  # a loss travels as loss / 64, inside Flower's clipping range (8 by default: losses up to 512)
EXTRAS = 2  # the numbers after the tensors: the scaled loss and the under-clip bit
CLEAR = (records.PARTITION_ID, records.ROUND_NONCE, records.EPSILON, records.REFUSED)  # metrics left in the clear

WEIGHT_RECORD = "fitres.num_examples"  # Flower's FitRes in records: the weight its mod masks (and keeps)

Next = Callable[[Message, Context], Message]


def secure_mod(msg: Message, context: Context, call_next: Next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a secure round; the others pass through."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    reply = secaggplus_mod(msg, context, partial(_masked_input, call_next))
    if WEIGHT_RECORD in reply.content:  # Flower's mod leaves the client's weight in the clear: only the sum
        reply.content[WEIGHT_RECORD] = MetricRecord({"num_examples": 0})  # of the masked ones may reach the server
    return reply


def update(payload: Tensors, start: Tensors, *, clip: float | None) -> tuple[Tensors, int | None]:
    """Delta = payload - start (float64); with ``clip`` (privacy=user) scaled to norm <= clip, and the bit
    1[||Delta|| <= clip] the server's adaptive clip counts."""
    delta = user_dp.update_of(payload, start)
    if clip is None:
        return delta, None
    clipped, size = user_dp.clip(delta, clip)
    return clipped, int(size <= clip)


def _masked_input(call_next: Next, msg: Message, context: Context) -> Message:
    """The ClientApp's reply, as the FitRes Flower's mod masks: the vector and its weight."""
    out = call_next(msg, context)
    if out.has_error():
        raise RuntimeError(f"the client failed: {out.error.reason}")
    content, config = out.content, msg.content[records.CONFIG]
    metrics = content[records.METRICS]
    update_record = content[records.ARRAYS]
    tensors = [update_record[k].numpy() for k in update_record]  # in key order, as the server's like
    loss = float(metrics.get(records.TRAIN_LOSS, 0.0)) / LOSS_SCALE
    extras = np.array([loss, float(metrics.get(records.UNDER_CLIP, 0))])
    weight = _weight(config, metrics)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([*tensors, extras]), weight, {})
    reply = fitres_to_recorddict(fitres, keep_input=False)
    reply[records.METRICS] = MetricRecord({k: metrics[k] for k in CLEAR if k in metrics})
    for name in (records.PRIVACY, records.PLACEMENT):
        if name in content:
            reply[name] = content[name]
    return Message(RecordDict(reply), reply_to=msg)


def _weight(config, metrics) -> float:
    """The client's weight in the masked sum: 0 when it refused (DP budget), the server's table's, its own
    example count capped at the round's ``max-weight``, or 1 (uniform weighting)."""
    if metrics.get(records.REFUSED):
        return 0
    if records.SECURE_WEIGHT in config:
        return float(config[records.SECURE_WEIGHT])
    if records.NUM_EXAMPLES in metrics:
        return float(min(metrics[records.NUM_EXAMPLES], config[records.MAX_WEIGHT]))
    return 1


def zeros_like(tensors: Tensors) -> Tensors:
    """A refusing client's update: nothing, with the shapes its masks need."""
    return {k: torch.zeros_like(t, dtype=torch.float64) for k, t in tensors.items()}
