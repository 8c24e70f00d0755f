"""Wire format: message keys as constants, adapter tensors <-> ArrayRecord."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedlora.lora import AdapterKey, Tensors

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SERVER_ROUND = "server-round"
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
TRAIN_LOSS = "train-loss"
LOCAL_STEPS = "local-steps"
FIXED = "fixed"  # tensors fixed for the run, sent once per node and kept in its context.state
FIXED_DIGEST = "fixed-digest"
PHASE = "phase"
PHASE_INIT = "gradient-init"  # round 0 of a gradient-initialised strategy (LoRA-SB)
INIT_EXAMPLES = "init-examples"


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
