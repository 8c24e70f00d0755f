"""The final global model on disk, in the most standard form that holds it, and its loader.

- Strategies that keep the base weights (FedAvg, FFA-LoRA, FedSVD, Fed-SB, LoRA-FAIR):
  a peft LoRA adapter (Fed-SB's R folded into B), loaded with
  ``PeftModel.from_pretrained(base, folder)``.
- Strategies that fold updates into the base weights (FLoRA, FedEx): the accumulated
  update, s * sum over rounds of B_f A_f plus the current adapter, as one peft LoRA
  of the summed rank when that has fewer numbers than the dense update of the
  adapted weights; otherwise the merged model (W0 + D + s B A, head included) in
  transformers' format, loaded with ``AutoModelForSequenceClassification.from_pretrained(folder)``.

:func:`load_exported` loads either. ``labels.json`` lists the label names in order.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from fedlora import lora
from fedlora.checkpoint import write_json
from fedlora.folding import FoldLog, numbers
from fedlora.lora import LORA_ROLES, Role, Tensors
from fedlora.model import build_peft_model
from fedlora.worker import Worker

ADAPTER_CONFIG = "adapter_config.json"
LABELS = "labels.json"


def export_adapter(worker: Worker, state: Tensors, folder: Path, *, fold_log: FoldLog | None = None) -> Path:
    """Write the global model (``state``, and the base delta of ``fold_log``) to ``folder``.

    Nothing folded (no ``fold_log``, or one at version 0): a peft LoRA adapter.
    """
    worker.set_base(fold_log.delta if fold_log is not None else {})
    worker.load(state)  # the worker's model is the global model afterwards, for every strategy
    adapter = worker.strategy.export(state)
    if fold_log is None or fold_log.version == 0:
        with lora.plain_lora(worker.model):  # Fed-SB's R is folded into B: a standard peft LoRA
            lora.write(lora.adapter_parameters(worker.model), adapter)
            worker.model.save_pretrained(str(folder))
    elif (stacked := _stacked_update(fold_log, adapter)) is not None:
        _save_lora(worker, stacked | {k: v for k, v in adapter.items() if k.role not in LORA_ROLES}, folder)
    else:
        merged = copy.deepcopy(worker.model).merge_and_unload()
        merged.save_pretrained(str(folder))
    write_json(folder / LABELS, list(worker.splits.label_names))
    return folder


def _stacked_update(fold_log: FoldLog, adapter: Tensors) -> Tensors | None:
    """Every fold and the adapter as one LoRA ([B_1 | B_2 | ..], [A_1; A_2; ..]); None when D is smaller."""
    rounds = fold_log.all_factors()
    if rounds is None:
        return None
    current = {k: v for k, v in adapter.items() if k.role in (Role.A, Role.B)}
    if any(v.any() for k, v in current.items() if k.role is Role.B):  # FLoRA's adapter is B = 0: leave it out
        rounds = [*rounds, current]
    if not rounds:
        return None
    stacked = {}
    for key in rounds[0]:
        stacked[key] = torch.cat([r[key] for r in rounds], dim=0 if key.role is Role.A else 1)
    return stacked if numbers(stacked) < numbers(fold_log.delta) else None


def _save_lora(worker: Worker, tensors: Tensors, folder: Path) -> None:
    """A peft LoRA of the tensors' (summed) rank, on a freshly built base, with the run's scale s."""
    cfg = worker.cfg
    rank = next(v.shape[0] for k, v in tensors.items() if k.role is Role.A)
    lora_cfg = dataclasses.replace(cfg.lora, rank=rank, alpha=worker.strategy.scaling * rank)
    model = build_peft_model(cfg.model, lora_cfg, num_labels=worker.splits.num_labels, seed=cfg.seed)
    lora.write(lora.adapter_parameters(model), tensors)
    model.save_pretrained(str(folder))


def load_exported(folder: str | Path, *, base: nn.Module | None = None) -> nn.Module:
    """The exported model: ``base`` with the adapter, or the merged model (``base`` not needed)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        if base is None:
            raise ValueError(f"{folder} holds a LoRA adapter: pass the base model it was trained on")
        return PeftModel.from_pretrained(base, str(folder))
    return AutoModelForSequenceClassification.from_pretrained(str(folder))


__all__ = ["export_adapter", "load_exported"]
