"""The ClientApp: trains the received adapter on this node's partition.

All heavy state lives in :mod:`fedlora.learning.worker`'s per-process cache, not in this
app's closure: Ray ships the ClientApp by value with every message, so the closure
holds only the App run config (a few hundred bytes); the config is read as the
ServerApp reads it (:func:`fedlora.config.app.from_run_config`, cached per process).
What a node must keep between rounds (tensors fixed for the run, sent once; its base
delta; its DP ledger) lives in its ``context.state``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import lora
from fedlora.config.app import from_run_config
from fedlora.config.run import RunConfig
from fedlora.federation import progress
from fedlora.federation.folding import catch_up
from fedlora.flower import records, secure_client
from fedlora.flower.secure_client import secure_mod
from fedlora.lora import Tensors
from fedlora.outputs.console import quiet_libraries
from fedlora.outputs.run_folder import PERSONAL_DIR
from fedlora.privacy.accounting import Step

if TYPE_CHECKING:
    from fedlora.learning.worker import Worker


def make_client_app(run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp for the App run config ``run_config`` (None: the context's, as deployed)."""
    app = ClientApp(mods=[secure_mod])  # a secure round's messages go through Flower's SecAgg+ mod

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, context)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        if run_config is None:  # deployed: its output goes to the SuperNode's log
            quiet_libraries()
        return train(msg, context, from_run_config(run_config if run_config is not None else context.run_config))

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, from_run_config(run_config if run_config is not None else context.run_config))

    return app


def query(msg: Message, context: Context) -> Message:
    """The node's partition id (so that the server samples clients by partition) and, when its node config
    says, how many parts its data is split into (Flower's local simulation gives every node both)."""
    node = context.node_config
    metrics = MetricRecord({records.PARTITION_ID: int(node[records.PARTITION_ID])})
    if records.NUM_PARTITIONS in node:
        metrics[records.NUM_PARTITIONS] = int(node[records.NUM_PARTITIONS])
    if node.get(records.DATA_PATH):
        metrics[records.OWN_DATA] = 1
    return Message(RecordDict({records.METRICS: metrics}), reply_to=msg)


def node_worker(msg: Message, context: Context, cfg: RunConfig) -> Worker:
    """This node's worker: the run's data, or the node's own (node config ``data-path``), split into
    ``num-partitions`` parts (default: the run's clients; 1: the whole file is this node's).

    The model's libraries (transformers, peft, datasets: 3.5 s of a deployed ClientApp process's 5.5 s of
    imports) load here, not with this module: a SuperNode starts a process per message, and a query or a
    SecAgg+ key-exchange message needs none of them."""
    from fedlora.learning.worker import get_worker

    node = context.node_config
    path = node.get(records.DATA_PATH)
    if path:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(path)))
    num_partitions = int(node.get(records.NUM_PARTITIONS, cfg.clients))
    labels = msg.content[records.CONFIG].get(records.LABELS)
    return get_worker(cfg, num_partitions=num_partitions, label_names=tuple(labels) if labels else None)


def train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """One round (or Fed-SB's round 0) of this client: train on its data, reply with the payload."""
    config = msg.content[records.CONFIG]
    cfg = cfg.with_clients(int(config.get(records.CLIENTS, cfg.clients)))  # the federation the server runs
    worker = node_worker(msg, context, cfg)
    pid = int(context.node_config[records.PARTITION_ID])
    server_round = int(config[records.SERVER_ROUND])
    init = config.get(records.PHASE) == records.PHASE_INIT
    ledger = Ledger(context, msg) if cfg.privacy.enabled else None
    metrics = MetricRecord({records.PARTITION_ID: pid})
    if records.ROUND_NONCE in config:  # echoed: the server takes this reply for this round only
        metrics[records.ROUND_NONCE] = int(config[records.ROUND_NONCE])
    content = RecordDict({records.METRICS: metrics})
    if ledger is not None:
        plan = worker.privacy_plan(pid)
        share = int(config[records.INIT_EXAMPLES]) if init else 0  # the init's rate is the server's ask / n
        asked = [plan.init_step_at(share / len(worker.data.rows(pid)))] if init else plan.round_steps
        if not plan.affords(ledger.history, *asked):
            content[records.PRIVACY] = records.ledger_record(ledger.history)
            metrics[records.REFUSED] = 1  # budget exhausted: this node's data is never used again
            metrics[records.EPSILON] = plan.spent(ledger.history)
            if config.get(records.SECURE):  # still in the protocol: nothing, of the shapes its masks need
                received = records.from_record(msg.content[records.ARRAYS]) | fixed_tensors(msg, context)
                start = worker.adapted.protocol.expected_reply(pid, received, server_round=server_round)
                content[records.ARRAYS] = records.to_record(secure_client.zeros_like(start))
            return Message(content, reply_to=msg)
    history = ledger.history if ledger is not None else None
    if init:
        from fedlora.learning import gradient_init

        share = int(config[records.INIT_EXAMPLES])
        payload, _ = gradient_init.client_share(worker, pid, num_examples=share, history=history)
    else:
        received = records.from_record(msg.content[records.ARRAYS])
        received |= fixed_tensors(msg, context)
        base = base_delta(msg, context, scaling=worker.strategy.scaling)
        if base is not None:  # the server checks that this node trained on its base weights
            metrics[records.BASE_DIGEST] = records.digest_number(base)
        # a simulation's console shows its steps; not under DP: with train.local_epochs the total tells its size
        reporting = progress.client_round(server_round, pid) if not cfg.privacy.any else contextlib.nullcontext()
        with reporting:
            payload, num_examples, result = worker.train_round(
                pid, received, server_round=server_round, base=base, history=history,
                personal=personal_tensors(context), own=records.rank_state(context.state),
            )  # fmt: skip
        if worker.adapted.protocol.personal:  # kept for this node's next round; never in the reply
            context.state[records.PERSONAL] = records.to_record(worker.adapted.personal())
        if result.rank_state is not None:  # a self-pruning client's rank, for its next rounds
            context.state[records.OWN_RANK] = records.rank_state_record(result.rank_state)
        if result.released_counts is not None:  # under DP: its test shard's mix for a personalised evaluation
            keep_released(context, result.released_counts)
        if ledger is None:  # a loss on private batches is not DP-protected: it stays on the client
            metrics[records.TRAIN_LOSS] = result.mean_loss
        if cfg.strategy.weighting == "examples":  # under DP: the noised count, or the exact one if declared public
            metrics[records.NUM_EXAMPLES] = num_examples
        if config.get(records.SECURE):  # the update from where the server's state starts it, for masking
            clip = float(config[records.CLIP_BOUND]) if records.CLIP_BOUND in config else None
            # where the server measures from too: Protocol.expected_reply of the state it sent (the received one)
            start = worker.adapted.protocol.expected_reply(pid, received, server_round=server_round)
            payload, under = secure_client.update(payload, start, clip=clip)
            if under is not None:
                metrics[records.UNDER_CLIP] = under
    if ledger is not None:
        ledger.save()
        content[records.PRIVACY] = records.ledger_record(ledger.history)
        metrics[records.EPSILON] = worker.privacy_plan(pid).spent(ledger.history)
    content[records.ARRAYS] = records.to_record(payload)
    if (where := placement(worker)) is not None:
        content[records.PLACEMENT] = where
    return Message(content, reply_to=msg)


def placement(worker: Worker) -> ConfigRecord | None:
    """Where this client ran, in a simulation: its Ray node's address, its process, the GPUs Ray gave it
    and the device it trained on (None when deployed: a SuperNode runs no Ray; its address is its
    connection's)."""
    import os
    import sys

    ray = sys.modules.get("ray")  # imported in every Ray worker; never imported here for this
    if ray is None or not ray.is_initialized():
        return None
    gpus = ",".join(map(str, ray.get_gpu_ids()))
    return ConfigRecord({records.HOST: str(ray.util.get_node_ip_address()), records.PID: os.getpid(),
                         records.GPUS: gpus, records.DEVICE: str(worker.device)})  # fmt: skip


def evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Personalised evaluation: the model this node would train from, on its test shard (two numbers back)."""
    config = msg.content[records.CONFIG]
    cfg = cfg.with_clients(int(config.get(records.CLIENTS, cfg.clients)))
    worker = node_worker(msg, context, cfg)
    pid = int(context.node_config[records.PARTITION_ID])
    received = records.from_record(msg.content[records.ARRAYS]) | fixed_tensors(msg, context)
    base = base_delta(msg, context, scaling=worker.strategy.scaling)
    mix = released_mix(context) if cfg.privacy.any else None
    if cfg.privacy.any and (mix is None or cfg.privacy.user_level or context.node_config.get(records.DATA_PATH)):
        result: dict[str, float] = {"examples": 0}  # under DP only the shared test split, in the mix it released
    else:
        own = records.rank_state(context.state)
        result = worker.evaluate_personal(pid, received, base=base, personal=personal_tensors(context), label_mix=mix,
                                          own_rank=own.rank if own is not None else None)  # fmt: skip
        result = result if "accuracy" in result else {"examples": 0}  # records without labels: no accuracy
    if config.get(records.EXPORT_PERSONAL) and worker.adapted.protocol.personal:
        export_personal(worker, pid, result)
    metrics = MetricRecord({
        records.PARTITION_ID: pid, records.ROUND_NONCE: int(config[records.ROUND_NONCE]),
        records.PERSONAL_ACCURACY: float(result.get("accuracy", 0.0)),
        records.PERSONAL_EXAMPLES: int(result["examples"]),
    })  # fmt: skip
    return Message(RecordDict({records.METRICS: metrics}), reply_to=msg)


app = make_client_app()


class Ledger:
    """This client's privacy accountant history, kept in its node state between rounds (and processes).

    The server returns the history each reply stated; a node that lost its state (a
    restarted run) takes that copy, and never a shorter one than its own.
    """

    def __init__(self, context: Context, msg: Message) -> None:
        self.context = context
        held = context.state.config_records.get(records.PRIVACY)
        self.history: list[Step] = records.ledger_history(held) if held is not None else []
        if records.PRIVACY in msg.content:
            told = records.ledger_history(msg.content[records.PRIVACY])
            if len(told) > len(self.history):
                self.history = told

    def save(self) -> None:
        self.context.state[records.PRIVACY] = records.ledger_record(self.history)


def export_personal(worker: Worker, pid: int, result: dict[str, float]) -> Path:
    """This client's own model (the shared tensors with its personal ones, as it just evaluated it) as an
    export in ``<output_dir>/personal/partition_<pid>`` on this node's disk; nothing of it is sent."""
    from fedlora.outputs.export import export_adapter

    folder = Path(worker.cfg.output_dir or "outputs/serverapp") / PERSONAL_DIR / f"partition_{pid}"
    state = lora.read(worker.adapted.params)
    summary = {"partition": pid, "personal_accuracy": result.get("accuracy"), "test_examples": result["examples"]}
    return export_adapter(worker, state, folder, summary=summary)


def keep_released(context: Context, counts: tuple[float, ...]) -> None:
    """Add a round's released (noised) label counts to this node's state."""
    held = context.state.config_records.get(records.RELEASED_COUNTS)
    total = [float(x) for x in held["sum"]] if held is not None else [0.0] * len(counts)
    rounds = int(held["rounds"]) if held is not None else 0
    summed = [a + b for a, b in zip(total, counts, strict=True)]
    context.state[records.RELEASED_COUNTS] = ConfigRecord({"sum": summed, "rounds": rounds + 1})


def released_mix(context: Context) -> list[float] | None:
    """The label mix of the counts this node released under DP (their sum; None before its first round):
    a mean of noised releases, so the more rounds the closer to its data's mix, at no further cost."""
    held = context.state.config_records.get(records.RELEASED_COUNTS)
    return [float(x) for x in held["sum"]] if held is not None else None


def personal_tensors(context: Context) -> Tensors | None:
    """This node's personal tensors (FedSA-LoRA's B) from its state; None before its first round."""
    return records.from_record(context.state[records.PERSONAL]) if records.PERSONAL in context.state else None


def fixed_tensors(msg: Message, context: Context) -> Tensors:
    """The run's fixed tensors: from the message (then kept in ``context.state``) or from the state.

    Fails when the node does not hold the ones the server names (e.g. after a restart):
    the server then sends them with the node's next round.
    """
    want = str(msg.content[records.CONFIG].get(records.FIXED_DIGEST, ""))
    if not want:
        return {}
    if records.FIXED in msg.content:
        context.state[records.FIXED] = msg.content[records.FIXED]
        context.state[records.FIXED_DIGEST] = ConfigRecord({records.FIXED_DIGEST: want})
    held = context.state.config_records.get(records.FIXED_DIGEST)
    if held is None or held[records.FIXED_DIGEST] != want:
        raise RuntimeError("this node does not hold the run's fixed tensors; the server will resend them")
    return records.from_record(context.state[records.FIXED])


def base_delta(msg: Message, context: Context, *, scaling: float) -> Tensors | None:
    """This node's base-weight delta D after the message's fold update (None: the strategy does not fold).

    D and its version live in ``context.state``; a node whose version does not fit
    the update (a restart) fails its round and is sent the server's D next time.
    """
    update = records.get_fold_update(msg.content)
    if update is None:
        return None
    held = context.state.config_records.get(records.BASE_VERSION)
    version = int(held[records.BASE_VERSION]) if held is not None else 0
    delta = records.from_record(context.state[records.BASE_DELTA]) if version and held is not None else {}
    delta = catch_up(delta, version, update, scaling=scaling)
    if update.end != version or update.dense is not None:
        context.state[records.BASE_DELTA] = records.to_record(delta)
        context.state[records.BASE_VERSION] = ConfigRecord({records.BASE_VERSION: update.end})
    return delta
