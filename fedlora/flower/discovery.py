"""Which node holds which partition: the server asks every connected node once, before round 1.

Flower's node ids are random; fedlora samples clients by partition id, so the server
maps partition ids to nodes. A node with a malformed answer, a partition outside the
federation or one another node already holds is left out (and logged), never trusted.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.federation import stopping
from fedlora.flower import records

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The nodes the run needs did not connect: one line says how many did and what to change."""


JOIN_TIMEOUT_S = 30.0  # how long a round waits for newly connected nodes to say their partition
JOIN_ASKS = 3  # a node that never answers is asked in this many rounds, then left out
# How long a connected node may take to answer its first query: its first ClientApp fetches the FAB and starts
# a new process (about 35 s on a busy 2-core machine). Not server.node_timeout, the wait for nodes to connect:
# a short one (20 s) made the answers expire at the SuperLink. Nodes that answer end the wait at once.
ANSWER_S = 120.0
SETTLE_S = 10.0  # no new node for this long: look at whether the connected nodes are the whole federation


def discover_partitions(
    grid: Grid, *, expected: int, timeout: float, min_nodes: int | None = None
) -> tuple[dict[int, int], int, set[int]]:
    """(partition id -> node id, the federation's number of clients, the partitions whose nodes train on
    their own data file), asking each connected node once.

    The run waits for ``expected`` nodes (its ``clients``). Flower's local simulation starts
    its own number of SuperNodes (2 by default), each told its partition id and the number
    of partitions M: when the nodes connected for ``SETTLE_S`` seconds are exactly such a
    federation (M nodes, ids 0..M-1, all saying M), the run goes on with ``clients=M``.
    After ``timeout`` seconds the run starts with the nodes connected if they are at least
    ``min_nodes`` (None: all ``expected``), else :class:`FederationError`.
    """
    deadline = time.monotonic() + timeout
    count, changed, told = -1, time.monotonic(), 0.0
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        stopping.check()
        now = time.monotonic()
        if len(node_ids) != count:
            count, changed = len(node_ids), now
        if now - told >= 30 or told == 0.0:
            log.info("waiting for nodes: %d of %d connected", len(node_ids), expected)
            told = now
        if node_ids and now - changed >= SETTLE_S:
            found, parts, own, _ = _ask_partitions(grid, node_ids, timeout=max(timeout, ANSWER_S), expected=None)
            size = _whole_federation(found, parts)
            if size:
                log.warning(
                    "the connected nodes are a federation of %d clients (each says num-partitions=%d): "
                    "running with clients=%d instead of %d", size, size, size, expected,
                )  # fmt: skip
                return found, size, own
            changed = now  # ask again only after the next quiet spell
        if now > deadline and node_ids and len(node_ids) >= (min_nodes or expected):
            found, own, _ = _ask_federation(grid, node_ids, timeout=max(timeout, ANSWER_S), expected=expected)
            missing = sorted(set(range(expected)) - set(found))
            log.warning(
                "partition(s) %s have no node after server.node_timeout=%g s: starting with %d of %d nodes "
                "(server.min_nodes=%d); a missing partition is skipped when sampled and joins when its node connects",
                missing, timeout, len(found), expected, min_nodes,
            )  # fmt: skip
            return found, expected, own
        if now > deadline:
            raise FederationError(
                f"only {len(node_ids)} of {expected} client nodes connected within server.node_timeout={timeout:g} s; "
                f"start {expected} SuperNodes (Flower's local simulation: options.num-supernodes = {expected} in "
                f"$FLWR_HOME/config.toml) or run with clients={len(node_ids) or 1}"
            )
        time.sleep(1.0)
    found, own, _ = _ask_federation(grid, node_ids, timeout=max(timeout, ANSWER_S), expected=expected)
    if missing := sorted(set(range(expected)) - set(found)):
        log.warning("partition(s) %s have no node that answered; they join when their node connects", missing)
    return found, expected, own


def ask_new_nodes(
    grid: Grid, node_ids: list[int], *, expected: int, taken: set[int], timeout: float
) -> tuple[dict[int, int], set[int], set[int]]:
    """(partition id -> node id, own-data partitions, the node ids that answered) of nodes that connected
    after the run started, for partitions that no node holds yet (a claim on a taken one is left out)."""
    try:
        found, own, answered = _ask_federation(grid, node_ids, timeout=timeout, expected=expected)
    except FederationError:
        return {}, set(), set()
    for pid in sorted(set(found) & taken):
        log.warning("node %d claims partition %d, which a node of this run holds; left out", found.pop(pid), pid)
    return found, own & set(found), answered


def _ask_federation(
    grid: Grid, node_ids: list[int], *, timeout: float, expected: int
) -> tuple[dict[int, int], set[int], set[int]]:
    """:func:`_ask_partitions` for a federation of ``expected`` clients: (partition id -> node id, the
    partitions trained on data other than the server's table, the node ids that answered)."""
    found, parts, own, answered = _ask_partitions(grid, node_ids, timeout=timeout, expected=expected)
    own |= {pid for pid, n in parts.items() if n != expected}  # split otherwise than the server's table
    return found, own, answered


def _whole_federation(found: dict[int, int], parts: dict[int, int]) -> int:
    """M when the nodes are partitions 0..M-1 of a federation of M (M > 1), each saying so; else 0."""
    sizes = set(parts.values())
    if len(sizes) == 1 and (size := sizes.pop()) > 1 and sorted(found) == list(range(size)) and len(parts) == size:
        return size
    return 0


def _ask_partitions(
    grid: Grid, node_ids: list[int], *, timeout: float, expected: int | None
) -> tuple[dict[int, int], dict[int, int], set[int], set[int]]:
    """(partition id -> node id, partition id -> the num-partitions its node config says where it says,
    the partitions whose nodes say they train on their own data, the node ids that answered at all).

    A node whose answer is malformed, names a partition outside 0..expected-1 (when
    ``expected`` is given) or one another node already claimed is left out and logged.
    """
    messages = [
        Message(
            RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY, ttl=timeout
        )
        for n in node_ids
    ]
    found: dict[int, int] = {}
    parts: dict[int, int] = {}
    own: set[int] = set()
    answered: set[int] = set()
    for reply in sorted(grid.send_and_receive(messages, timeout=timeout), key=lambda m: m.metadata.src_node_id):
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            log.warning("node %d did not say its partition: %s", node, reply.error.reason)
            continue
        try:
            metrics = reply.content[records.METRICS]
            pid = int(metrics[records.PARTITION_ID])
            num = int(metrics[records.NUM_PARTITIONS]) if records.NUM_PARTITIONS in metrics else None
            own_data = bool(metrics.get(records.OWN_DATA, 0))
        except (KeyError, TypeError, ValueError) as err:
            log.warning("node %d: malformed partition answer (%s: %s); left out", node, type(err).__name__, err)
            continue
        if pid < 0 or (expected is not None and pid >= expected):
            log.warning("node %d claims partition %d, outside 0..%d; left out", node, pid, (expected or 1) - 1)
        elif pid in found:
            log.warning("node %d claims partition %d, which node %d holds; left out", node, pid, found[pid])
        else:
            found[pid] = node
            if num is not None:
                parts[pid] = num
            if own_data:
                own.add(pid)
    if not found:
        raise FederationError("no node answered the partition query with a valid partition id")
    return found, parts, own, answered
