"""Round 0 of a gradient initialisation (Fed-SB's LoRA-SB init from the clients' base-weight gradients):
sent, collected and checked as every round is, by the run's :class:`~fedlora.flower.rounds.FlowerRounds`."""

from __future__ import annotations

import logging
import math

from flwr.serverapp import Grid

from fedlora.federation.validation import reject_reason
from fedlora.flower import records
from fedlora.flower.collect import collect
from fedlora.flower.messages import init_messages
from fedlora.flower.replies import Reply
from fedlora.flower.rounds import FlowerRounds
from fedlora.lora import Tensors
from fedlora.outputs.metrics import RoundStats
from strategies.base import GradientInit

log = logging.getLogger(__name__)


def gradient_round(rounds: FlowerRounds, grid: Grid, init: GradientInit, *, expected: Tensors) -> Tensors:
    """The summed base-weight gradients of the clients sampled for round 0, each over its share of
    ``init.samples`` examples, sent once (counted in round 0's stats). ``expected``: zeros shaped
    as a reply must be."""
    chosen = [pid for pid in rounds.sample(0) if pid in rounds.nodes]
    stats = rounds.stats[0] = RoundStats(replies_expected=len(chosen))
    share = math.ceil(init.samples / len(chosen))
    config = {
        records.SERVER_ROUND: 0, records.PHASE: records.PHASE_INIT, records.INIT_EXAMPLES: share,
        records.LABELS: rounds.label_names, records.CLIENTS: rounds.cfg.clients,
    }  # fmt: skip
    outgoing = init_messages([(pid, rounds.nodes[pid]) for pid in chosen], config, ttl=rounds.ttl)

    def check(pid: int, reply: Reply) -> Tensors | str:
        gradients = reply.tensors or {}
        reason = reject_reason(gradients, expected)  # no norm bound: gradients are sums, not changes
        return reason if reason is not None else gradients

    server = rounds.cfg.server
    accepted = collect(
        grid, outgoing, nodes=rounds.nodes, stats=stats, server_round=0, timeout=server.round_timeout,
        straggler_factor=server.straggler_factor, private=rounds.cfg.privacy.enabled, check=check,
        on_progress=rounds.on_progress,
    )  # fmt: skip
    total: Tensors = {}
    for _, gradients in accepted:
        for key, grad in gradients.items():
            total[key] = total[key] + grad.double() if key in total else grad.double()
    if not total:
        raise RuntimeError("no client gave a valid gradient for the initialisation (round 0)")
    log.info("gradient initialisation from %d clients: %d numbers uploaded", len(accepted), stats.numbers_up)
    return {k: v.float() for k, v in total.items()}
