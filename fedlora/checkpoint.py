"""Atomic checkpoints of the server's state and the run's metrics log."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedlora.lora import AdapterKey, Tensors

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.csv"
METRIC_COLUMNS = (
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "replies_expected",
    "replies_received",
    "replies_rejected",
    "numbers_up",
    "bytes_up",
    "numbers_down",
    "bytes_down",
    "wall_s",
)


def _atomic(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder and rename: never a half file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(folder: Path, state: Tensors, *, server_round: int, meta: Mapping[str, Any] | None = None) -> Path:
    """The server's tensors after ``server_round``, as safetensors; ``meta`` (JSON) in its metadata."""
    path = folder / CHECKPOINT
    tensors = {str(k): v.contiguous() for k, v in state.items()}
    metadata = {"round": str(server_round), "meta": json.dumps(dict(meta or {}), sort_keys=True)}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def load_checkpoint(path: Path) -> tuple[Tensors, int]:
    """(tensors, round) from :func:`save_checkpoint`."""
    tensors, server_round, _ = load_checkpoint_meta(path)
    return tensors, server_round


def load_checkpoint_meta(path: Path) -> tuple[Tensors, int, dict[str, Any]]:
    """(tensors, round, meta) from :func:`save_checkpoint`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    meta = json.loads(metadata.get("meta", "{}"))
    return {AdapterKey.parse(k): v for k, v in load_file(str(path)).items()}, int(metadata["round"]), meta


class MetricsLog:
    """metrics.csv: one row per round (round 0 is the model before training).

    ``extra``: the strategy's own diagnostic columns (LoRA-FAIR's residuals), after the common ones.
    """

    def __init__(self, path: Path, *, extra: tuple[str, ...] = (), resume_after: int | None = None) -> None:
        """A new log, or (``resume_after``) the existing one cut after that round (a resumed run)."""
        self.path = path
        self.columns = (*METRIC_COLUMNS, *extra)
        kept = []
        if resume_after is not None and path.exists():
            kept = [r for r in read_metrics(path) if int(r["round"]) <= resume_after]
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            writer.writerows([[r.get(c, "") for c in self.columns] for r in kept])

    def append(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"not metric columns: {sorted(unknown)}")
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_cell(row.get(c)) for c in self.columns])


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_json(path: Path, data: Any) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True)))
