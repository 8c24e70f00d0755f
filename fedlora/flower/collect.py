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

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

from fedlora.federation import stopping
from fedlora.flower import records
from fedlora.flower.replies import Reply, parse_reply
from fedlora.outputs.metrics import RoundStats
from fedlora.privacy.accounting import Step

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[int, int], None]
POLL_S = 0.5  # how often the server asks for replies (Flower's own loop waits 3 s between asks)
# Flower's simulation answers from the driver's memory: asking costs microseconds, and at 0.5 s a round of
# tiny clients took 1.0 or 1.5 s depending on when its last reply fell between two asks
SIMULATION_POLL_S = 0.05
STRAGGLER_MIN_S = 60.0  # the least a straggler is waited for: about the ~60 s in which Flower declares a dead node


def exchange(
    grid: Grid,
    messages: list[Message],
    *,
    timeout: float,
    on_progress: Progress | None,
    straggler_factor: float | None = None,
) -> list[Message]:
    """Push ``messages`` and pull their replies until every node answered or ``timeout`` seconds passed.

    A node has answered once anything of it arrived: a reply to its message, or one to another message
    (an old round's), which will be rejected; the server never waits for a reply that cannot come. A
    dead node answers too: Flower's SuperLink replies for it with an error once it missed its
    heartbeats. Only a live node that keeps silent costs a wait, so with ``straggler_factor`` the
    wait ends sooner: once half the nodes answered, after t seconds, the others get at most
    max(``STRAGGLER_MIN_S``, factor x t) more."""
    if not messages:
        return []
    ids = list(grid.push_messages(messages))
    node_of = {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=True)}
    waiting = set(ids)
    started = time.monotonic()
    deadline = started + timeout
    cut = straggler_factor is None
    replies: list[Message] = []
    while waiting and time.monotonic() < deadline:
        stopping.check()
        pulled = list(grid.pull_messages(waiting))
        if pulled:
            replies += pulled
            for m in pulled:
                answered = m.metadata.reply_to_message_id
                waiting -= (
                    {answered} if answered in node_of else {i for i in waiting if node_of[i] == m.metadata.src_node_id}
                )
            if on_progress is not None:
                on_progress(len(replies), len(messages))
            if not cut and len(waiting) <= len(messages) // 2:  # half answered: the rest are stragglers
                now, cut = time.monotonic(), True
                deadline = min(deadline, now + max(STRAGGLER_MIN_S, straggler_factor * (now - started)))
        if waiting:
            time.sleep(poll_s(grid))
    return replies


def poll_s(grid: Grid) -> float:
    """How long to wait between asks for replies: ``SIMULATION_POLL_S`` on the simulation's in-memory grid."""
    return SIMULATION_POLL_S if isinstance(grid, InMemoryGrid) else POLL_S


@dataclass
class NodeState:
    """What the server knows of one client's node."""

    node_id: int
    holds_fixed: bool = False  # it holds the run's current fixed tensors (Fed-SB's A and B)
    base_version: int | None = 0  # the folds its base weights hold; None: unknown (it failed or was silent)
    ledger: list[Step] | None = None  # its DP accountant history, as its latest reply stated it
    responsive: bool = True  # it answered its latest message (a silent or failed node gets no evaluation to wait on)
    trained: bool = False  # an update of its was accepted in this server's life (round 1 on)


@dataclass
class Outgoing:
    """One message of a round and what it brings its node, should the node reply."""

    partition: int
    message: Message
    carries_fixed: bool = False
    base_version: int | None = None  # the base version the message's fold update brings the node to


def settle(nodes: dict[int, NodeState], outgoing: list[Outgoing], answered: set[int]) -> None:
    """What a round's messages brought the nodes that answered (their fixed tensors, their base version);
    one that did not answer is unresponsive and its base version unknown."""
    for o in outgoing:
        node = nodes[o.partition]
        node.responsive = o.partition in answered
        if o.carries_fixed and o.partition in answered:
            node.holds_fixed = True
        if o.base_version is not None:
            node.base_version = o.base_version if o.partition in answered else None


def collect(
    grid: Grid,
    outgoing: list[Outgoing],
    *,
    nodes: dict[int, NodeState],
    stats: RoundStats,
    server_round: int,
    timeout: float,
    private: bool,
    check: Callable[[int, Reply], T | str],
    on_progress: Progress | None = None,
    straggler_factor: float | None = None,
) -> list[tuple[int, T]]:
    """Send ``outgoing``, wait up to ``timeout`` s (less for stragglers: :func:`exchange`), and return
    (partition, checked reply) in partition order.

    Every reply is parsed (:func:`fedlora.flower.replies.parse_reply`; ``private``: the run
    is DP) and must answer a message of this round from the node it was sent to; then
    ``check(partition, reply)`` gives what the round aggregates, or why the reply is
    rejected. A rejection is logged with the node id and never ends the round. ``stats``
    counts replies received (without error), refused (DP budget), rejected, and the bytes
    up of every reply that carries an update. ``on_progress(done, expected)`` hears of
    every reply as it arrives.
    """
    replies = exchange(grid, [o.message for o in outgoing], timeout=timeout, on_progress=on_progress,
                       straggler_factor=straggler_factor)  # fmt: skip
    asked = {o.message.metadata.message_id: o for o in outgoing}  # ids are set once sent
    arrived: list[tuple[int, Message]] = []
    strays = 0
    seen: set[str] = set()
    for m in replies:
        if (answered := m.metadata.reply_to_message_id) in seen:  # delivered twice: counted, aggregated once
            log.warning("round %d: dropped a second copy of node %d's reply", server_round, m.metadata.src_node_id)
            continue
        seen.add(answered)
        o = asked.get(m.metadata.reply_to_message_id)  # by message id: an error reply comes from the SuperLink
        if o is None:
            strays += 1
            log.warning("round %d: rejected a reply of node %d to no message of this round",
                        server_round, m.metadata.src_node_id)  # fmt: skip
        elif m.has_error():
            log.warning("round %d: partition %s failed: %s", server_round, o.partition, m.error.reason)
            nodes[o.partition].holds_fixed = False  # it may have lost its fixed tensors
        else:
            arrived.append((o.partition, m))
    answered = {pid for pid, m in arrived if m.metadata.src_node_id == nodes[pid].node_id}
    replied = {asked[i].partition for m in replies if (i := m.metadata.reply_to_message_id) in asked}
    silent = sorted({o.partition for o in outgoing} - replied)
    if silent:
        log.warning(
            "round %d: partition(s) %s did not reply in time (server.round_timeout=%g s, server.straggler_factor=%s)",
            server_round, silent, timeout, straggler_factor,
        )  # fmt: skip
    settle(nodes, outgoing, answered)
    stats.replies_received = len(arrived)
    stats.replies_rejected = strays

    accepted: list[tuple[int, T]] = []
    where: dict[str, list[str]] = {}  # in a simulation: each Ray node's clients, with their process and device
    for pid, m in sorted(arrived, key=lambda pm: pm[0]):
        if isinstance(arrays := m.content.get(records.ARRAYS), ArrayRecord):
            stats.add_up(records.size(arrays))  # what was sent, accepted or not
        reply = parse_reply(m, private=private)
        if isinstance(reply, str):
            checked: T | str = reply
        elif pid not in answered:
            checked = f"it answers partition {pid}'s message but is not that partition's node"
        elif reply.partition != pid:
            checked = f"it claims partition {reply.partition}"
        else:
            if reply.ledger is not None and len(reply.ledger) >= len(nodes[pid].ledger or []):
                nodes[pid].ledger = reply.ledger  # never a shorter one
            if reply.epsilon is not None:
                stats.epsilons.append(reply.epsilon)
            if (p := reply.placement) is not None:
                where.setdefault(p.host, []).append(f"partition {pid} [{p}]")
            if reply.refused:
                stats.refused += 1  # budget exhausted: no update
                continue
            checked = check(pid, reply)
        if isinstance(checked, str):
            log.warning(
                "round %d: rejected the reply of partition %s (node %d): %s",
                server_round, pid, m.metadata.src_node_id, checked,
            )  # fmt: skip
            stats.replies_rejected += 1
            continue
        accepted.append((pid, checked))
    if where:
        log.info("round %d: clients ran on %s", server_round,
                 "; ".join(f"{host}: {', '.join(clients)}" for host, clients in sorted(where.items())),
                 extra={"file_only": True})  # fmt: skip
    if stats.refused:
        log.warning("round %d: %d client(s) refused: privacy budget exhausted", server_round, stats.refused)
    return accepted
