"""Where fedlora keeps what it makes once and reads many times: $FEDLORA_CACHE, or ~/.cache/fedlora.

Two things live there: GGUF models converted to transformers folders (``models/``), and the Flower
App's run-config defaults (``app-defaults/``), which take about two seconds of Hydra composition to
derive and which every ClientApp process of a deployment would otherwise derive again for each
message. Each entry is keyed by what it is made from, so a changed source makes a new entry and a
stale one is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    return Path(os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora")


def digest(files: Iterable[Path], root: Path) -> str:
    """A short hash of ``files``' names (relative to ``root``) and contents, in a fixed order."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def json_once(kind: str, key: str, make: Callable[[], Any]) -> Any:
    """``make()``'s JSON value, read from ``<cache>/<kind>/<key>.json`` when there, made and kept otherwise.

    Written to a temporary file and renamed into place, so a process starting beside another reads a
    whole entry or none; a cache that cannot be written (read-only home) only costs the time again.
    """
    path = cache_root() / kind / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    value = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".partial", delete=False) as out:
            json.dump(value, out)
        os.replace(out.name, path)
    except OSError:
        pass
    return value
