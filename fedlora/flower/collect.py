"""Sending a round's messages and collecting the replies: one helper for every kind of round.

What the server keeps per client node (:class:`NodeState`) is updated here, in one
place, from what came back: a failed node may have lost its fixed tensors, a silent
one's base version is unknown, a reply's DP ledger is kept. Replies are mapped to
partitions by message id, logged when they fail, time out or are refused, counted,
checked, and returned in partition order, so that aggregation never depends on
arrival order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from flwr.app import Message
from flwr.serverapp import Grid

from fedlora.accounting import Step
from fedlora.flower import records
from fedlora.metrics import RoundStats

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[int, int], None]
POLL_S = 0.5  # how often the server asks for replies (Flower's own loop waits 3 s between asks)


def exchange(grid: Grid, messages: list[Message], *, timeout: float, on_progress: Progress | None) -> list[Message]:
    """Push ``messages`` and pull their replies until all came or ``timeout`` seconds passed."""
    if not messages:
        return []
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while waiting and time.monotonic() < deadline:
        pulled = list(grid.pull_messages(waiting))
        if pulled:
            replies += pulled
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if on_progress is not None:
                on_progress(len(replies), len(messages))
        if waiting:
            time.sleep(POLL_S)
    return replies


@dataclass
class NodeState:
    """What the server knows of one client's node."""

    node_id: int
    holds_fixed: bool = False  # it holds the run's current fixed tensors (Fed-SB's A and B)
    base_version: int | None = 0  # the folds its base weights hold; None: unknown (it failed or was silent)
    ledger: list[Step] | None = None  # its DP accountant history, as its latest reply stated it


@dataclass
class Outgoing:
    """One message of a round and what it brings its node, should the node reply."""

    partition: int
    message: Message
    carries_fixed: bool = False
    base_version: int | None = None  # the base version the message's fold update brings the node to


def collect(
    grid: Grid,
    outgoing: list[Outgoing],
    *,
    nodes: dict[int, NodeState],
    stats: RoundStats,
    server_round: int,
    timeout: float,
    check: Callable[[int, Message], T | str],
    on_progress: Progress | None = None,
) -> list[tuple[int, T]]:
    """Send ``outgoing``, wait up to ``timeout`` s, and return (partition, checked reply) in partition order.

    ``check(partition, reply)`` gives what the round aggregates, or why the reply is
    rejected. ``stats`` counts replies received (without error), refused (DP budget),
    rejected, and the bytes up of every reply that carries an update. ``on_progress(done,
    expected)`` hears of every reply as it arrives.
    """
    replies = exchange(grid, [o.message for o in outgoing], timeout=timeout, on_progress=on_progress)
    asked = {o.message.metadata.message_id: o for o in outgoing}  # ids are set once sent
    arrived: list[tuple[int | None, Message]] = []
    for m in replies:
        o = asked.get(m.metadata.reply_to_message_id)  # by message id: an error reply comes from the SuperLink
        pid = o.partition if o is not None else None
        if m.has_error():
            log.warning("round %d: partition %s failed: %s", server_round, pid, m.error.reason)
            if pid is not None:
                nodes[pid].holds_fixed = False  # it may have lost its fixed tensors
        else:
            arrived.append((pid, m))
    answered = {pid for pid, m in arrived if pid is not None and m.metadata.src_node_id == nodes[pid].node_id}
    replied = {
        asked[m.metadata.reply_to_message_id].partition for m in replies if m.metadata.reply_to_message_id in asked
    }
    silent = sorted({o.partition for o in outgoing} - replied)
    if silent:
        log.warning(
            "round %d: partition(s) %s did not reply within server.round_timeout=%g s", server_round, silent, timeout
        )
    for o in outgoing:
        node = nodes[o.partition]
        if o.carries_fixed and o.partition in answered:
            node.holds_fixed = True
        if o.base_version is not None:
            node.base_version = o.base_version if o.partition in answered else None
    stats.replies_received = len(arrived)

    accepted: list[tuple[int, T]] = []
    for pid, m in sorted(arrived, key=lambda pm: pm[0] or 0):
        metrics = m.content.metric_records.get(records.METRICS, {})
        if pid is not None and records.PRIVACY in m.content:
            history = records.ledger_history(m.content[records.PRIVACY])
            if len(history) >= len(nodes[pid].ledger or []):  # never a shorter one
                nodes[pid].ledger = history
        if records.EPSILON in metrics:
            stats.epsilons.append(float(metrics[records.EPSILON]))
        if int(metrics.get(records.REFUSED, 0)):
            stats.refused += 1  # budget exhausted: no update
            continue
        if records.ARRAYS in m.content:
            stats.add_up(records.size(m.content[records.ARRAYS]))
        if pid is None or pid not in answered:
            checked: T | str = "a reply to no message of this round, or from another node"
        else:
            checked = check(pid, m)
        if isinstance(checked, str):
            log.warning(
                "round %d: rejected the reply of partition %s (node %d): %s",
                server_round, pid, m.metadata.src_node_id, checked,
            )  # fmt: skip
            stats.replies_rejected += 1
            continue
        accepted.append((pid, checked))
    if stats.refused:
        log.warning("round %d: %d client(s) refused: privacy budget exhausted", server_round, stats.refused)
    return accepted
