"""Personalised evaluation: every node evaluates the model it would use on its own test shard.

After an evaluated round the server sends every connected node that answered its latest message
(a dead node is not waited for twice) an ``evaluate`` message built
like a training message (the download, the base-weight catch-up, fixed tensors it lacks); the
node loads what it would train from (the global adapter at its rank, its personal tensors such
as FedSA-LoRA's B, its base weights) and evaluates it on its share of the test split, in its
partition's label mix (:meth:`fedlora.learning.client_data.ClientData.test_shards`). The reply
is two numbers, parsed strictly; the server reports the mean over the clients and the mean of
the worst tenth (at least one client), and the bytes the messages took (``personal_bytes_down``:
not in ``bytes_down``, which counts the training messages; a node that catches up on base
weights here needs that much less in its next training round).

Under DP (sample level) a client's accuracy on a shard chosen by its private label counts would be an
unprotected release: a node evaluates only once it has released label counts (noised and charged with
its rounds, for the logit adjustment), on rows of the shared test split drawn in the mean of the mixes
it released (:meth:`~fedlora.learning.client_data.ClientData.released_test_shard`), with a DP-trained
model: the reply is post-processing of what it released. Off under user-level DP, without logit
adjustment, on a node's own data file (its test rows are private too) and under secure aggregation
(the server would see each client's statistic alone). A causal LM's accuracy is its label ranking's, so
on instruction records with labels only.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import TYPE_CHECKING

from flwr.app import Message, MessageType, MetricRecord
from flwr.serverapp import Grid

from fedlora.flower import records
from fedlora.flower.collect import exchange, settle
from fedlora.flower.messages import round_config, train_messages
from fedlora.outputs.metrics import RoundStats

if TYPE_CHECKING:
    from fedlora.config.run import RunConfig
    from fedlora.flower.rounds import FlowerRounds

log = logging.getLogger(__name__)

COLUMNS = ("personal_accuracy", "personal_worst10", "personal_bytes_down")


def available(cfg: RunConfig, *, labelled: bool) -> bool:
    """Whether a run evaluates personalised accuracy (see the module's docstring for when not); ``labelled``:
    the data has labels (a causal LM's accuracy ranks them: free-text records have none)."""
    private_ok = not cfg.privacy.any or (cfg.privacy.enabled and bool(cfg.train.logit_adjustment))
    return cfg.train.personal_eval and labelled and not cfg.server.secure and private_ok


def summarise(accuracies: list[float]) -> dict[str, float]:
    """The mean over the clients and the mean of the worst tenth of them (at least one)."""
    if not accuracies:
        return {}
    worst = sorted(accuracies)[: max(1, math.ceil(len(accuracies) / 10))]
    return {"personal_accuracy": sum(accuracies) / len(accuracies), "personal_worst10": sum(worst) / len(worst)}


def read_reply(m: Message, pid: int, nonce: int) -> float | str:
    """The accuracy a node reported, or why its reply is not one."""
    metrics = m.content.get(records.METRICS)
    if set(m.content.keys()) != {records.METRICS} or not isinstance(metrics, MetricRecord):
        return "not a single metric record"
    if set(metrics.keys()) != {records.PARTITION_ID, records.ROUND_NONCE, records.PERSONAL_ACCURACY,
                               records.PERSONAL_EXAMPLES}:  # fmt: skip
        return f"unexpected metrics {sorted(metrics.keys())[:5]}"
    if metrics[records.PARTITION_ID] != pid or metrics[records.ROUND_NONCE] != nonce:
        return "it answers another partition or round"
    accuracy, examples = metrics[records.PERSONAL_ACCURACY], metrics[records.PERSONAL_EXAMPLES]
    if not (isinstance(accuracy, float | int) and 0 <= accuracy <= 1 and isinstance(examples, int)):
        return f"accuracy {accuracy!r} on {examples!r} examples"
    return float(accuracy) if examples > 0 else "an empty test shard"


def personal_round(rounds: FlowerRounds, grid: Grid, server_round: int, *, export: bool = False) -> dict[str, float]:
    """Every connected node's personalised accuracy after ``server_round``, summarised (empty: none replied).
    ``export``: each node also writes the model it evaluated to its own disk (its personal tensors stay there)."""
    online = set(grid.get_node_ids())
    private = rounds.cfg.privacy.any  # only nodes that released label counts, on the shared test split
    chosen = [
        (pid, node) for pid, node in rounds.nodes.items()
        if node.node_id in online and node.responsive and not (private and (not node.trained or pid in rounds.own_data))
    ]  # fmt: skip
    nonce = secrets.randbits(62)
    fixed = rounds.strategy.fixed(rounds.state)
    config = round_config(server_round, nonce, fixed, labels=rounds.label_names, clients=rounds.cfg.clients)
    config[records.EXPORT_PERSONAL] = export
    stats = RoundStats()  # its own: bytes_down counts the training messages
    outgoing = train_messages(
        chosen, rounds.protocol.download(rounds.state), fixed, config, fold_log=rounds.fold_log,
        stats=stats, ttl=rounds.ttl, message_type=MessageType.EVALUATE,
    )  # fmt: skip
    server = rounds.cfg.server
    replies = exchange(grid, [o.message for o in outgoing], timeout=server.round_timeout, on_progress=None,
                       straggler_factor=server.straggler_factor)  # fmt: skip
    asked = {o.message.metadata.message_id: o for o in outgoing}
    accuracies, answered = [], set()
    for m in replies:
        o = asked.pop(m.metadata.reply_to_message_id, None)
        if o is None or m.metadata.src_node_id != rounds.nodes[o.partition].node_id:
            continue
        if m.has_error():
            log.warning("round %d: partition %d failed its evaluation: %s", server_round, o.partition, m.error.reason)
            continue
        answered.add(o.partition)
        value = read_reply(m, o.partition, nonce)
        if isinstance(value, str):
            log.warning("round %d: rejected partition %d's evaluation: %s", server_round, o.partition, value)
        else:
            accuracies.append(value)
    settle(rounds.nodes, outgoing, answered)
    return summarise(accuracies) | {"personal_bytes_down": stats.bytes_down}
