"""Every name in a run's folder, in one place, and which of them mean the folder holds a run.

A run writes ``metrics.csv``, ``server.log``, the checkpoint (and the server optimiser's moments beside
it), ``partitions.csv``, its config three ways (``config.yaml``; ``run_config.json``, the flat form;
Hydra's ``.hydra/``), the final ``adapter/`` and, with trackers, ``tensorboard/`` or ``mlflow.db``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

METRICS = "metrics.csv"
SERVER_LOG = "server.log"
CHECKPOINT = "checkpoint.safetensors"
SERVER_OPTIMIZER = "server_optimizer.safetensors"  # the server optimiser's moments, beside the checkpoint
PARTITIONS = "partitions.csv"
CONFIG = "config.yaml"
RUN_CONFIG = "run_config.json"
HYDRA = ".hydra"  # Hydra's own record: config.yaml and overrides.yaml
HYDRA_OVERRIDES = "overrides.yaml"
ADAPTER_DIR = "adapter"
TENSORBOARD = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
# Inside an export (the adapter folder): fedlora's record of the model, task and labels.
EXPORT_META = "fedlora.json"
EXPORT_LABELS = "labels.json"

# What a run writes in its folder: a folder holding any of these holds a run.
RUN_OUTPUTS = (
    METRICS, CHECKPOINT, SERVER_OPTIMIZER, ADAPTER_DIR, SERVER_LOG, PARTITIONS, CONFIG, RUN_CONFIG, HYDRA,
    TENSORBOARD, MLFLOW_DB, MLFLOW_ARTIFACTS,
)  # fmt: skip


def held_outputs(out: Path) -> list[str]:
    """The run outputs ``out`` already holds."""
    return [name for name in RUN_OUTPUTS if (out / name).exists()]


def write_partitions(out: Path, label_names: Sequence[str], counts: Sequence[Sequence[int]]) -> None:
    """``partitions.csv``: every client's example count and label counts."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [f"{i},{sum(row)}," + ",".join(map(str, row)) for i, row in enumerate(counts)]
    (out / PARTITIONS).write_text("\n".join(["client,examples," + ",".join(label_names), *rows]) + "\n")
