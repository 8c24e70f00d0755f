"""Atomic checkpoints of the server's state (with what a resumed run needs) and JSON files."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlora.lora import AdapterKey, Tensors

CHECKPOINT = "checkpoint.safetensors"
SERVER_OPTIMIZER = "server_optimizer.safetensors"  # the server optimiser's moments, beside the checkpoint


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


def load_checkpoint_meta(path: Path) -> tuple[Tensors, int, dict[str, Any]]:
    """(tensors, round, meta) from :func:`save_checkpoint`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    meta = json.loads(metadata.get("meta", "{}"))
    return {AdapterKey.parse(k): v for k, v in load_file(str(path)).items()}, int(metadata["round"]), meta


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Named tensors as safetensors, written atomically."""
    _atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


def write_json(path: Path, data: Any) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True)))
