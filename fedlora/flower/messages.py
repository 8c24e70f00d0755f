"""The messages of a round: what each sampled node is sent (the download, the base-weight catch-up it
needs, the fixed tensors it lacks, its DP ledger), with the bytes counted as they are built."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedlora.federation.folding import FoldLog, FoldUpdate
from fedlora.flower import records
from fedlora.flower.collect import NodeState, Outgoing
from fedlora.lora import Tensors
from fedlora.outputs.metrics import RoundStats

log = logging.getLogger(__name__)


def round_config(server_round: int, nonce: int, fixed: Tensors, *, labels: Any, clients: int) -> dict[str, Any]:
    """What every message of a round states: the round and its nonce (a reply must echo it), the digest of
    the fixed tensors the node must hold, the label names and the number of clients."""
    return {
        records.SERVER_ROUND: server_round, records.ROUND_NONCE: nonce,
        records.FIXED_DIGEST: records.digest(fixed) if fixed else "", records.LABELS: labels,
        records.CLIENTS: clients,
    }  # fmt: skip


def train_messages(
    chosen: Sequence[tuple[int, NodeState]],
    download: Tensors,
    fixed: Tensors,
    config: Mapping[str, Any],
    *,
    fold_log: FoldLog,
    stats: RoundStats,
    ttl: float,
    message_type: str = MessageType.TRAIN,
) -> list[Outgoing]:
    """A training message per (partition, node): ``download`` and ``config`` for all, the fold update
    each node's base version needs, ``fixed`` where the node does not hold it yet. (``message_type``
    ``evaluate``: the same, for the personalised evaluation of the model each node would use.)"""
    server_round = config[records.SERVER_ROUND]
    arrays = records.to_record(download)
    fixed_record = records.to_record(fixed) if fixed else None
    arrays_size = records.size(arrays)
    fixed_size = records.size(fixed_record) if fixed_record is not None else (0, 0)
    fold_records: dict[object, ArrayRecord] = {}  # entry index or "dense" -> record, built once per round
    outgoing = []
    for pid, node in chosen:
        content_config = ConfigRecord(dict(config))
        content = RecordDict({records.ARRAYS: arrays, records.CONFIG: content_config})
        if node.ledger is not None:
            content[records.PRIVACY] = records.ledger_record(node.ledger)
        update = fold_log.update_for(node.base_version)
        if node.base_version is None or update.end > update.start + 1:
            log.info(
                "round %d: partition %d catches up on base weights: version %s -> %d (%s)", server_round, pid,
                "unknown" if node.base_version is None else node.base_version, update.end,
                "the server's D" if update.dense is not None else f"{len(update.entries)} folds",
            )  # fmt: skip
        fold_arrays = fold_update_records(update, fold_records)
        records.put_fold_update(content, content_config, update, fold_arrays)
        stats.add_down(arrays_size)
        for record in fold_arrays:
            stats.add_down(records.size(record))
        carries_fixed = fixed_record is not None and not node.holds_fixed
        if carries_fixed:
            content[records.FIXED] = fixed_record
            stats.add_down(fixed_size)
        message = Message(content, dst_node_id=node.node_id, message_type=message_type, ttl=ttl)
        outgoing.append(Outgoing(pid, message, carries_fixed=carries_fixed, base_version=update.end))
    return outgoing


def init_messages(chosen: Sequence[tuple[int, NodeState]], config: Mapping[str, Any], *, ttl: float) -> list[Outgoing]:
    """Round 0 of a gradient initialisation: the phase and each client's share of examples, its ledger."""
    record = ConfigRecord(dict(config))
    outgoing = []
    for pid, node in chosen:
        content = RecordDict({records.CONFIG: record})
        if node.ledger is not None:
            content[records.PRIVACY] = records.ledger_record(node.ledger)
        message = Message(content, dst_node_id=node.node_id, message_type=MessageType.TRAIN, ttl=ttl)
        outgoing.append(Outgoing(pid, message))
    return outgoing


def fold_update_records(update: FoldUpdate, cache: dict[object, ArrayRecord]) -> list[ArrayRecord]:
    """The records carrying ``update``: D, or one per entry (each converted once per round)."""
    if update.dense is not None:
        if "dense" not in cache:
            cache["dense"] = records.to_record(update.dense)
        return [cache["dense"]]
    out = []
    for i, entry in enumerate(update.entries, start=update.start):
        if i not in cache:
            cache[i] = records.to_record(entry)
        out.append(cache[i])
    return out
