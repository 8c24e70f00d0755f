"""Wire format: message keys as constants, adapter tensors <-> ArrayRecord."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlora.federation.folding import FoldUpdate
from fedlora.lora import AdapterKey, Tensors
from fedlora.privacy.accounting import Step
from strategies.ranks import RankState

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SERVER_ROUND = "server-round"
ROUND_NONCE = "round-nonce"  # a random number per round that every reply echoes: a reply answers this round
NUM_EXAMPLES = "num-examples"  # only when weighting by examples (under DP: noised, or declared public)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
OWN_DATA = "own-data"  # a node's answer to the partition query: 1 when it trains on its own data file
TRAIN_LOSS = "train-loss"  # not under DP: a loss on private batches is not protected
FIXED = "fixed"  # tensors fixed for the run, sent once per node and kept in its context.state
FIXED_DIGEST = "fixed-digest"
PHASE = "phase"
PHASE_INIT = "gradient-init"  # round 0 of a gradient-initialised strategy (LoRA-SB)
INIT_EXAMPLES = "init-examples"
# Base weights that change (FLoRA, FedEx): a catch-up of folded factors, or the server's D
FOLD_START = "fold-start"
FOLD_END = "fold-end"
FOLD_DENSE = "fold-dense"
FOLD_ENTRY = "fold-{}"  # the factors folded in round (version) i + 1
PERSONAL_ACCURACY = "personal-accuracy"  # an evaluate reply: accuracy of the node's model on its test shard
PERSONAL_EXAMPLES = "personal-examples"  # ... and the shard's size
PERSONAL = "personal"  # a node's personal tensors (FedSA-LoRA's B), in its context.state, never sent
RELEASED_COUNTS = "released-counts"  # under DP: the sum of the noised label counts a node released, and how many
EXPORT_PERSONAL = "export-personal"  # the last evaluation: the node also writes its personal model to its own disk
BASE_DELTA = "base-delta"  # a node's D and its version, in its context.state
BASE_VERSION = "base-version"
BASE_DIGEST = "base-digest"  # a reply's fingerprint of the D it trained on (digest_number), checked by the server
# DP-SGD: a client's accountant history in its node state; what it reports each round
PRIVACY = "privacy"
PLACEMENT = "placement"  # simulation only: where a client ran (Ray node, process, GPUs, device), for the server log
HOST, PID, GPUS, DEVICE = "host", "pid", "gpus", "device"
EPSILON = "epsilon"
REFUSED = "refused"  # 1: the client's budget is exhausted, it did not train
CLIENTS = "clients"  # the federation's size the server runs with (it may be the nodes', see server_app)
LABELS = "label-names"  # the run's labels, so that a node's own data file maps to them by name
# Secure aggregation (fedlora.flower.secure): the round's flag, the weight the server's table gives a client,
# the most any client may put in the masked sum, user-level DP's clip bound and a client's bit under it
SECURE = "secure"
SECURE_WEIGHT = "secure-weight"
MAX_WEIGHT = "max-weight"
CLIP_BOUND = "clip-bound"
UNDER_CLIP = "under-clip"
DATA_PATH = "data-path"  # node config: this node's data file or folder (default: the run's data)
OWN_RANK = "own-rank"  # a self-pruning (HetLoRA) node's rank and tail norm, in its context.state, never sent


def to_record(tensors: Tensors) -> ArrayRecord:
    """Tensors keyed by ``str(AdapterKey)``, in key order."""
    return ArrayRecord(
        {str(k): Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in sorted(tensors.items())}
    )


def from_record(record: ArrayRecord) -> Tensors:
    return {AdapterKey.parse(k): torch.from_numpy(a.numpy().copy()) for k, a in record.items()}


def size(record: ArrayRecord) -> tuple[int, int]:
    """(numbers, bytes) of a record as sent: element counts and serialised array bytes."""
    numbers = sum(int(np.prod(a.shape)) for a in record.values())
    return numbers, sum(len(a.data) for a in record.values())


def digest(tensors: Tensors) -> str:
    """A short content hash of ``tensors`` (keys, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for key, value in sorted(tensors.items()):
        v = value.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(v.shape)}:{v.dtype}".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


def put_fold_update(content: RecordDict, config: ConfigRecord, update: FoldUpdate, arrays: list[ArrayRecord]) -> None:
    """Put ``update`` in a message: versions in ``config``, ``arrays`` (entries or D as records) in ``content``."""
    config[FOLD_START], config[FOLD_END] = update.start, update.end
    if update.dense is not None:
        (content[FOLD_DENSE],) = arrays
    else:
        for i, record in enumerate(arrays, start=update.start):
            content[FOLD_ENTRY.format(i)] = record


def get_fold_update(content: RecordDict) -> FoldUpdate | None:
    """The update a message carries (None: the run's strategy does not fold)."""
    config = content[CONFIG]
    if FOLD_END not in config:
        return None
    start, end = int(config[FOLD_START]), int(config[FOLD_END])
    if FOLD_DENSE in content:
        return FoldUpdate(start, end, dense=from_record(content[FOLD_DENSE]))
    return FoldUpdate(start, end, entries=[from_record(content[FOLD_ENTRY.format(i)]) for i in range(start, end)])


def ledger_record(history: list[Step]) -> ConfigRecord:
    """A DP accountant history (noise, sample rate, steps per release) as a ConfigRecord."""
    noise, rate, steps = zip(*history, strict=True) if history else ((), (), ())
    return ConfigRecord(
        {"noise": [float(x) for x in noise], "rate": [float(x) for x in rate], "steps": [int(x) for x in steps]}
    )


def ledger_history(record: ConfigRecord) -> list[Step]:
    """Inverse of :func:`ledger_record`."""
    return list(zip(record["noise"], record["rate"], record["steps"], strict=True))


def digest_number(tensors: Tensors) -> int:
    """:func:`digest` as a 52-bit integer: a metric that survives a float64 round trip exactly."""
    return int(digest(tensors)[:13], 16)


def rank_state(state: RecordDict) -> RankState | None:
    """A self-pruning node's rank state from its ``context.state`` (None before it has trained)."""
    held = state.config_records.get(OWN_RANK)
    return RankState(int(held["rank"]), float(held["tail-norm"])) if held is not None else None


def rank_state_record(state: RankState) -> ConfigRecord:
    """Inverse of :func:`rank_state`."""
    return ConfigRecord({"rank": state.rank, "tail-norm": state.tail_norm})
