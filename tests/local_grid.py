"""A Flower Grid that delivers each message to a real ClientApp in this process (tests only).

fedlora's ServerApp talks to its clients through four Grid calls (push, pull, node ids,
send-and-receive); this grid answers them by calling each node's ``ClientApp`` with its
own ``Context``, as a SuperNode would, and turns an exception into an error reply, as
Flower does. No Ray, no SuperLink: a many-round attack runs in seconds and the replies
are exactly what the apps return.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid:
    def __init__(self, nodes: dict[int, tuple[ClientApp, dict]], run_config: dict | None = None) -> None:
        """``nodes``: node id -> (its ClientApp, its node config)."""
        self.apps = {node: app for node, (app, _) in nodes.items()}
        self.contexts = {
            node: Context(1, node, node_config=dict(config), state=RecordDict(), run_config=dict(run_config or {}))
            for node, (_, config) in nodes.items()
        }
        self._replies: dict[str, Message] = {}
        # Flower stamps new messages with the process's task identity, which a ServerApp process has.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = message_id = str(uuid4())  # as Flower's grids do
            node = msg.metadata.dst_node_id
            delivered = copy.deepcopy(msg)  # as received off the wire: a node's app may change its copy
            try:
                reply = self.apps[node](delivered, self.contexts[node])
            except Exception as err:  # the node's app failed: Flower sends an error reply
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def grid_for(cfg) -> LocalGrid:
    """One fedlora ClientApp per partition of ``cfg``, node ids 1.. in partition order."""
    from fedlora.config.app import run_config_for
    from fedlora.flower import records
    from fedlora.flower.client_app import make_client_app

    app = make_client_app(run_config_for(cfg))
    config = {records.NUM_PARTITIONS: cfg.clients}
    return LocalGrid({pid + 1: (app, {records.PARTITION_ID: pid, **config}) for pid in range(cfg.clients)})


def run_in_process(cfg, grid: LocalGrid | None = None) -> Path:
    """``cfg``'s run on the real ServerApp and one fedlora ClientApp per partition (or ``grid``), in this process."""
    from fedlora.flower.server_app import run_server

    return run_server(grid or grid_for(cfg), cfg)
