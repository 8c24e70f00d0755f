"""Using an export: ``fedlora predict`` (labels for texts), ``fedlora generate`` (completions), merging.

Each loads the export with its own tokenizer and base (:func:`fedlora.outputs.export.load_exported`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from fedlora.config.run import ConfigError
from fedlora.outputs.export import FEDLORA, LABELS, load_exported


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


def generate(folder: Path, prompts: Iterable[str], *, max_new_tokens: int = 64) -> Iterator[str]:
    """Greedy completions by an exported causal LM, each prompt rendered with the model's chat template."""
    from transformers import AutoTokenizer

    from fedlora.learning.causal_lm import render
    from fedlora.learning.decoding import generate_ids

    meta = json.loads((folder / FEDLORA).read_text()) if (folder / FEDLORA).is_file() else {}
    if meta.get("task") != "causal_lm":
        raise ConfigError(f"{folder} is not a causal-LM export (task=causal_lm); use fedlora predict")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = load_exported(folder).eval()
    for prompt in prompts:
        prompt = prompt.replace("\\n", "\n")  # a shell passes "\n" as backslash-n: the user meant a new line
        ids = tokenizer(render(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = generate_ids(model, ids, max_new_tokens=max_new_tokens, eos=tokenizer.eos_token_id)
        yield tokenizer.decode(out, skip_special_tokens=True)


def merge(folder: Path, out: Path) -> Path:
    """The export's adapter merged into its base: a plain transformers model folder (with the tokenizer)."""
    from transformers import AutoTokenizer

    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty: choose another folder for the merged model")
    model = load_exported(folder)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(out))
    for name in (LABELS, FEDLORA):
        if (folder / name).is_file():
            (out / name).write_text((folder / name).read_text())
    return out
