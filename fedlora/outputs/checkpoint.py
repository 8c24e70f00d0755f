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
from fedlora.outputs.run_folder import CHECKPOINT


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


def resumable_settings(cfg: Any) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint's (not: rounds, output, server tolerances)."""
    return {
        k: v
        for k, v in cfg.to_flat().items()
        if k not in ("rounds", "output_dir") and k.split(".")[0] not in ("server", "simulation")
    }


def read_checkpoint(path: Path, *, initial: Tensors, cfg: Any) -> tuple[Tensors, int, dict[str, Any]]:
    """(tensors, round, meta) of the checkpoint a run with config ``cfg`` and initial state ``initial`` may
    resume from; anything else raises ConfigError with one line (nothing has started yet).

    Checked: the file reads; the run's settings are the checkpoint's; ``rounds`` is at least
    its round; its adapter tensors have exactly the initial state's keys, shapes and dtypes;
    every tensor (base-weight deltas included) is finite floating point.
    """
    from fedlora.config.run import ConfigError
    from fedlora.lora import Role

    try:
        tensors, server_round, meta = load_checkpoint_meta(path)
    except Exception as err:  # truncated, empty, garbage, foreign: safetensors and json raise many kinds
        raise ConfigError(f"{path} is not a readable fedlora checkpoint ({type(err).__name__}: {err})") from None
    theirs, ours = meta.get("config", {}), resumable_settings(cfg)
    if differ := sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k)):
        shown = ", ".join(f"{k}={theirs.get(k)!r} (now {ours.get(k)!r})" for k in differ[:3])
        raise ConfigError(f"{path} is from a different run: {shown}; resume with its settings")
    if server_round > cfg.rounds:
        raise ConfigError(f"{path} is after round {server_round} but rounds={cfg.rounds}; set rounds >= {server_round}")
    adapter = {k: v for k, v in tensors.items() if k.role is not Role.BASE}
    if missing := sorted(map(str, initial.keys() - adapter.keys())):
        raise ConfigError(f"{path} lacks {len(missing)} tensor(s) of this run, e.g. {missing[0]}")
    if extra := sorted(map(str, adapter.keys() - initial.keys())):
        raise ConfigError(f"{path} holds {len(extra)} tensor(s) this run does not have, e.g. {extra[0]}")
    for key, value in sorted(tensors.items()):
        want = initial.get(key)
        if want is not None and (value.shape != want.shape or value.dtype != want.dtype):
            raise ConfigError(
                f"{path}: {key} is {value.dtype} {tuple(value.shape)}, expected {want.dtype} {tuple(want.shape)}"
            )
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ConfigError(f"{path}: {key} holds NaN, Inf or non-float values")
    return tensors, server_round, meta


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Named tensors as safetensors, written atomically."""
    _atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


def write_json(path: Path, data: Any) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True)))
