"""Flower's simulation engine at 10,000 clients: its node table handed to the ServerApp, its queue fed in O(cohort).

Two costs of Flower's engine grow with the population, not the cohort, and made a
10,000-client simulation start in hours (measured: no round 1 after minutes):

- fedlora's ServerApp maps partitions to nodes by asking every node (a deployment's
  node ids say nothing of partitions; :mod:`fedlora.flower.discovery`). In a
  simulation the engine itself assigns partition i to a node it registers, so the
  query is N messages through Ray for a table the driver already holds.
  :class:`SimulatedNodes` takes that table as the engine registers its nodes; the
  simulation's ServerApp reads it instead of asking.
- The engine's feeder asks its link state, for each of the N nodes, every 0.1 s, for
  messages for that node, and each ask scans every stored message: O(N x M) per sweep
  (N = 10,000 nodes, M = the messages in flight), one core busy for nothing while the
  clients train. Here the feeder first finds the nodes that have an undelivered
  message (one pass over the M stored ones) and asks only for those: O(M^2 + M) per
  sweep, the same messages delivered the same way (Flower's own call marks them).

Both replace module attributes of Flower's engine for the duration of one simulation
(Flower looks them up when the simulation starts), as :mod:`fedlora.flower.ray_pool`
does; with a link state that is not Flower's in-memory one the feeder falls back to
Flower's sweep.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


class SimulatedNodes:
    """The simulation's partition id -> node id, as Flower's engine registered its nodes."""

    def __init__(self) -> None:
        self._table: dict[int, int] = {}
        self._ready = threading.Event()

    def record(self, node_to_partition: dict[int, int]) -> None:
        self._table = {int(pid): int(node) for node, pid in node_to_partition.items()}
        self._ready.set()

    def table(self, *, timeout: float) -> dict[int, int]:
        """The table, once the engine registered its nodes (it does before any ServerApp message)."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"Flower's simulation engine registered no nodes within {timeout:g} s")
        return dict(self._table)


def pending_nodes(state: Any, nodes: Any) -> Any:
    """The nodes among ``nodes`` with an undelivered message in ``state`` (Flower's in-memory link
    state); all of ``nodes`` for another state."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return nodes
    with lock:
        waiting = {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}
    return [n for n in waiting if n in nodes]


@contextlib.contextmanager
def scaled_engine(nodes: SimulatedNodes) -> Iterator[None]:
    """Within: Flower's engine records its node table in ``nodes`` and feeds its queue from the nodes that
    have messages (see the module's docstring)."""
    from flwr.server.superlink.fleet.vce import vce_api

    register = vce_api._register_nodes

    def recording_register(*args: Any, **kwargs: Any) -> dict[int, int]:
        mapping = register(*args, **kwargs)
        nodes.record(mapping)
        return mapping

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: dict[int, int], f_stop: Any) -> None:
        while not f_stop.is_set():
            for node_id in pending_nodes(state, nodes_mapping):
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            f_stop.wait(0.1)

    with replaced(vce_api, _register_nodes=recording_register, add_messages_to_queue=add_messages_to_queue):
        yield


@contextlib.contextmanager
def replaced(module: Any, **attributes: Any) -> Iterator[None]:
    """Within: ``module``'s named attributes are the given ones (Flower's, for one simulation); then restored."""
    saved = {name: getattr(module, name) for name in attributes}
    for name, value in attributes.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
