"""Secure aggregation (``server.secure_aggregation=secaggplus``): the server learns a round's weighted mean
update and nothing of one client's, by Flower's SecAgg+ (Bell et al., CCS 2020).

The protocol is Flower's, on both sides: its ``SecAggPlusWorkflow`` here (key exchange, Shamir
shares of each client's mask seed and key, unmasking, dequantisation), its ``secaggplus_mod`` on
the client (:mod:`fedlora.flower.secure_client`). The bridge: the workflow's four stages are
called one by one with a :class:`~flwr.server.compat.LegacyContext` whose strategy only names the
round's nodes and takes the unmasked mean, and a grid
(:class:`~fedlora.flower.secure_stages.StageGrid`) that sends each stage's messages the way every
fedlora round does, counts their bytes and drops a malformed reply before the workflow reads it (a
malformed client is a dropped one: its masks are rebuilt from the others' shares). The "collect
masked vectors" stage carries each node's usual training message.

What the server then holds: the weighted mean (:mod:`fedlora.flower.secure_client` says of what),
within the quantisation error: each client's weighted value is stochastically rounded to a grid
of step 2 c / T (``secagg_clipping_range`` c, ``secagg_quantization_range`` T), so a coordinate
of the mean is off by less than 2 c / T x (clients / sum of their weights in max-weight units),
2 c / T = 3.8e-6 at the defaults with equal weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedlora.config.federated import MOD_RANGE
from fedlora.config.run import RunConfig
from fedlora.flower import records
from fedlora.flower.collect import NodeState, Outgoing, settle
from fedlora.flower.replies import parse_reply
from fedlora.flower.secure_client import EXTRAS, LOSS_SCALE
from fedlora.flower.secure_stages import StageGrid
from fedlora.lora import Tensors
from fedlora.outputs.metrics import RoundStats

log = logging.getLogger(__name__)
DEFAULT_MAX_WEIGHT = 1000.0  # Flower's, where the server knows no client's example count


@dataclass
class SecureMean:
    """What a secure round unmasked: the weighted mean update, mean training loss, the number under the clip
    (privacy=user) and the number of clients in the sum."""

    update: Tensors
    train_loss: float | None
    under: float
    count: int


class _Bridge(FedAvg):
    """The legacy strategy the workflow asks: the round's nodes (each gets its own message later) and,
    at the end, the unmasked mean."""

    def __init__(self, nodes: list[int]) -> None:
        super().__init__()
        self.nodes = nodes
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(SimpleNamespace(node_id=n), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


def secure_mean(
    grid: Grid,
    outgoing: list[Outgoing],
    *,
    cfg: RunConfig,
    like: Tensors,
    nodes: dict[int, NodeState],
    stats: RoundStats,
    server_round: int,
    nonce: int,
    known: dict[int, int],
    clip: float | None,
) -> SecureMean | None:
    """Run one round's SecAgg+ over ``outgoing`` (each node's training message, told what :func:`prepare`
    tells it); None when it could not complete (fewer than the threshold left, or nothing to unmask)."""
    top = prepare(outgoing, cfg, known, clip=clip)
    server = cfg.server
    workflow = SecAggPlusWorkflow(
        _count_or_fraction(server.secagg_num_shares), _count_or_fraction(server.secagg_reconstruction_threshold),
        max_weight=top, clipping_range=server.secagg_clipping_range,
        quantization_range=server.secagg_quantization_range, modulus_range=MOD_RANGE, timeout=server.round_timeout,
    )  # fmt: skip
    by_node = {o.message.metadata.dst_node_id: o for o in outgoing}
    shapes = [(1,), *(tuple(t.shape) for _, t in sorted(like.items())), (EXTRAS,)]
    answered: set[int] = set()

    def check_masked(reply: Message) -> str | None:
        o = by_node[reply.metadata.src_node_id]
        parsed = parse_reply(reply, private=cfg.privacy.enabled, secure=True)
        if isinstance(parsed, str):
            return parsed
        if parsed.partition != o.partition or parsed.round_nonce != nonce:
            return f"it claims partition {parsed.partition} of round nonce {parsed.round_nonce}"
        vectors = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        if [v.shape for v in vectors] != shapes or any(v.dtype.kind not in "iu" for v in vectors):
            return "its masked vector does not have the round's shapes"
        if any(((v < 0) | (v >= MOD_RANGE)).any() for v in vectors):
            return "its masked vector leaves the modulus"
        answered.add(o.partition)
        if parsed.ledger is not None and len(parsed.ledger) >= len(nodes[o.partition].ledger or []):
            nodes[o.partition].ledger = parsed.ledger
        if parsed.epsilon is not None:
            stats.epsilons.append(parsed.epsilon)
        stats.refused += int(parsed.refused)
        return None

    stage_grid = StageGrid(grid, stats=stats, timeout=server.round_timeout, straggler_factor=server.straggler_factor,
                           check_masked=check_masked)  # fmt: skip
    bridge = _Bridge(sorted(by_node))
    context = _legacy_context(bridge, server_round)
    state = WorkflowState()
    contributors: set[int] = set()
    flower_log = logging.getLogger("flwr")
    level = flower_log.level
    flower_log.setLevel(logging.WARNING)  # the workflow's INFO lines would speak of its legacy strategy
    try:
        stages = (workflow.setup_stage, workflow.share_keys_stage, workflow.collect_masked_vectors_stage,
                  workflow.unmask_stage)  # fmt: skip
        for i, stage in enumerate(stages):
            done = stage(stage_grid, context, state)
            if i == 0:  # the "collect masked vectors" stage carries each node's own training message
                state.nid_to_fitins = {n: by_node[n].message.content for n in state.nid_to_fitins}
            elif i == 1:  # see forget_the_keyless
                forget_the_keyless(state)
            elif i == 2:
                contributors = set(state.active_node_ids)
            if not done:
                break
    except Exception as err:  # a failed unmasking (e.g. nothing weighed) leaves the round without an update
        log.warning("round %d: secure aggregation failed: %s: %s", server_round, type(err).__name__, err)
    finally:
        flower_log.setLevel(level)
    settle(nodes, outgoing, answered)
    stats.replies_received = len(answered)
    if bridge.mean is None:
        log.warning("round %d: secure aggregation did not complete (%d of %d clients left); the global adapter "
                    "is unchanged", server_round, len(contributors), len(outgoing))  # fmt: skip
        return None
    arrays = bridge.mean
    update = {key: torch.from_numpy(np.asarray(a, dtype=np.float64).reshape(t.shape))
              for (key, t), a in zip(sorted(like.items()), arrays[:-1], strict=True)}  # fmt: skip
    loss, under = float(arrays[-1][0]) * LOSS_SCALE, float(arrays[-1][1])
    count = len(contributors) - stats.refused
    log.info("round %d: unmasked the weighted mean of %d client(s)' updates", server_round, count,
             extra={"file_only": True})  # fmt: skip
    return SecureMean(update, None if cfg.privacy.enabled else loss, under * count, count)


def prepare(outgoing: list[Outgoing], cfg: RunConfig, known_sizes: dict[int, int], *, clip: float | None) -> float:
    """Tell each training message that its round is secure, the client's weight where the server's table
    has it, the most weight any client may put in the sum (returned), and (privacy=user) the bound to clip to."""
    examples = cfg.strategy.weighting == "examples"
    known = [known_sizes.get(o.partition) for o in outgoing]
    top = 1.0 if not examples else max(known) if known and None not in known else DEFAULT_MAX_WEIGHT
    for o, size in zip(outgoing, known, strict=True):
        config = o.message.content[records.CONFIG]
        config[records.SECURE], config[records.MAX_WEIGHT] = 1, float(top)
        if examples and size is not None:
            config[records.SECURE_WEIGHT] = float(size)
        if clip is not None:
            config[records.CLIP_BOUND] = float(clip)
    return float(top)


def describe(cfg: RunConfig) -> str:
    """The run header's line: what the server sees, what a round survives, what it costs in precision."""
    s = cfg.server
    shares = f"{s.secagg_num_shares:.0%} of the cohort" if s.secagg_num_shares <= 1 else f"{s.secagg_num_shares:g}"
    t = s.secagg_reconstruction_threshold
    threshold = f"{t:.0%} of the shares" if t <= 1 else f"{t:g}"
    return (
        f"secure aggregation: Flower's SecAgg+; the server sees each round's weighted mean update only (shares to "
        f"{shares}, {threshold} rebuild a lost client's masks; quantisation step "
        f"{2 * s.secagg_clipping_range / s.secagg_quantization_range:.2g}); off, as they read each update: "
        "server.update_clip, server.max_weight_ratio"
    )


def forget_the_keyless(state: WorkflowState) -> None:
    """After the share-keys stage, the round's cohort is the nodes that completed it. Flower's workflow keeps
    one that left before (its keys or shares never came) and at unmasking finds no share of its secrets:
    the round fails, though no survivor holds a mask with it and there is nothing of it to remove."""
    kept = set(state.active_node_ids)
    state.sampled_node_ids = kept
    state.nid_to_neighbours = {n: others & kept for n, others in state.nid_to_neighbours.items() if n in kept}


def _count_or_fraction(value: float) -> int | float:
    """Flower's convention: a float in (0, 1] is a fraction, an int a count."""
    return float(value) if value <= 1 else int(value)


def _legacy_context(bridge: _Bridge, server_round: int) -> LegacyContext:
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})  # fmt: skip
    context = Context(run_id=0, node_id=0, node_config={}, state=state, run_config={})
    return LegacyContext(context, strategy=bridge)
