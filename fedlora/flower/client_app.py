"""The ClientApp: trains the received adapter on this node's partition.

All heavy state lives in :mod:`fedlora.worker`'s per-process cache, not in this
app's closure: Ray ships the ClientApp by value with every message, so the closure
holds only the flat run config (a few hundred bytes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.config import RunConfig
from fedlora.flower import records
from fedlora.worker import get_worker


def make_client_app(flat: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp for the run ``flat`` (or the context's run config when None)."""
    app = ClientApp()

    def run_config(context: Context) -> RunConfig:
        return RunConfig.from_flat(flat if flat is not None else context.run_config)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config[records.PARTITION_ID])
        return Message(RecordDict({records.METRICS: MetricRecord({records.PARTITION_ID: pid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = run_config(context)
        num_partitions = int(context.node_config.get(records.NUM_PARTITIONS, cfg.clients))
        worker = get_worker(cfg, num_partitions=num_partitions)
        pid = int(context.node_config[records.PARTITION_ID])
        received = records.from_record(msg.content[records.ARRAYS])
        server_round = int(msg.content[records.CONFIG][records.SERVER_ROUND])
        payload, num_examples, result = worker.train_round(pid, received, server_round=server_round)
        metrics = MetricRecord(
            {
                records.PARTITION_ID: pid,
                records.NUM_EXAMPLES: num_examples,
                records.TRAIN_LOSS: result.mean_loss,
                records.LOCAL_STEPS: result.steps,
            }
        )
        content = RecordDict({records.ARRAYS: records.to_record(payload), records.METRICS: metrics})
        return Message(content, reply_to=msg)

    return app


app = make_client_app()
