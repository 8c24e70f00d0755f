"""Wire format: message keys as constants, adapter tensors <-> ArrayRecord."""

from __future__ import annotations

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
