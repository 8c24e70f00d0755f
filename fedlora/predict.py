"""``fedlora predict``: labels for texts from an exported model (adapter or merged), with its own tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from fedlora.config import ConfigError
from fedlora.export import LABELS, load_exported


def predict(folder: Path, texts: Iterable[str], *, batch_size: int = 32, max_len: int = 128) -> Iterator[str]:
    """The label of each text, in order."""
    from transformers import AutoTokenizer

    if not (folder / LABELS).is_file():
        raise ConfigError(f"{folder} is not a fedlora export (no {LABELS} in it)")
    labels = json.loads((folder / LABELS).read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = load_exported(folder).eval()
    batch: list[str] = []

    def flush() -> Iterator[str]:
        enc = tokenizer(batch, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        with torch.no_grad():
            yield from (labels[i] for i in model(**enc).logits.argmax(-1).tolist())

    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()
