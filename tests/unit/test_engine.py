"""Flower's simulation engine at scale (fedlora.flower.engine): the queue fed from the nodes that have messages."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from fedlora.flower.engine import SimulatedNodes, pending_nodes


def message(node: int, delivered: bool) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at="t" if delivered else ""))


def test_only_nodes_with_an_undelivered_message_are_asked() -> None:
    """Flower's feeder asks each of N nodes every sweep; the nodes worth asking are those with a message
    not yet delivered (and only nodes of this simulation)."""
    store = {"a": message(7, False), "b": message(7, False), "c": message(9, True), "d": message(11, False),
             "e": message(99, False)}  # fmt: skip
    state = SimpleNamespace(message_ins_store=store, lock=threading.RLock())
    nodes = {7: 0, 9: 1, 11: 2}
    assert sorted(pending_nodes(state, nodes)) == [7, 11]
    store.clear()
    assert list(pending_nodes(state, nodes)) == []


def test_another_link_state_is_swept_as_flower_does() -> None:
    nodes = {7: 0, 9: 1}
    assert pending_nodes(SimpleNamespace(), nodes) is nodes


def test_the_node_table_is_the_engines_own_inverted() -> None:
    table = SimulatedNodes()
    with pytest.raises(TimeoutError, match="registered no nodes"):
        table.table(timeout=0.01)
    table.record({1234: 0, 987: 1, 55: 2})
    assert table.table(timeout=0) == {0: 1234, 1: 987, 2: 55}
