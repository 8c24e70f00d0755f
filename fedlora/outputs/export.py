"""The final global model on disk, in the most standard form that holds it, describing itself; its loader.

- Strategies that keep the base weights (FedAvg, FFA-LoRA, FedSVD, Fed-SB, LoRA-FAIR):
  a peft LoRA adapter (Fed-SB's R folded into B) with the head as ``modules_to_save``.
- Strategies that fold updates into the base weights (FLoRA, FedEx): the accumulated
  update, s * sum over rounds of B_f A_f plus the current adapter, as one peft LoRA
  of the summed rank when that has fewer numbers than the dense update of the
  adapted weights; otherwise the merged model (W0 + D + s B A, head included) in
  transformers' format.

Every export also holds the tokenizer, ``labels.json``, a model card (``README.md``,
written with ``huggingface_hub``'s ``ModelCard``: strategy, federation, data, privacy
and epsilon spent, final metrics, how to load it) and ``fedlora.json`` (what rebuilds
the base: its hub id or path, or the seed and architecture of a random init). An
adapter's ``adapter_config.json`` names ``task_type`` SEQ_CLS and, as its base, the hub
id the model came from (``model.hub_id``); for a model shipped in a Python package,
the package's copy is registered under that id in the local Hugging Face cache, so
the id resolves offline. :func:`load_exported` loads any export with no other input.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlora import __version__, lora
from fedlora.config.groups import ModelConfig
from fedlora.federation.folding import FoldLog, numbers
from fedlora.learning.model import build_peft_model, resolve_path
from fedlora.learning.pooling import use_pooling
from fedlora.learning.worker import Worker
from fedlora.lora import LORA_ROLES, Role, Tensors
from fedlora.outputs.checkpoint import write_json
from fedlora.outputs.run_folder import EXPORT_LABELS, EXPORT_META

ADAPTER_CONFIG = "adapter_config.json"
LABELS = EXPORT_LABELS
FEDLORA = EXPORT_META


def export_adapter(
    worker: Worker,
    state: Tensors,
    folder: Path,
    *,
    fold_log: FoldLog | None = None,
    summary: dict[str, Any] | None = None,
) -> Path:
    """Write the global model (``state``, and the base delta of ``fold_log``) to ``folder``.

    Nothing folded (no ``fold_log``, or one at version 0): a peft LoRA adapter. ``summary``:
    what the model card reports (final metrics, epsilon spent...).
    """
    worker.adapted.set_base(fold_log.delta if fold_log is not None else {})
    worker.adapted.load(state)  # the worker's model is the global model afterwards, for every strategy
    adapter = worker.strategy.export(state)
    if fold_log is None or fold_log.version == 0:
        with lora.plain_lora(worker.adapted.model):  # Fed-SB's R is folded into B: a standard peft LoRA
            lora.write(lora.adapter_parameters(worker.adapted.model), adapter)
            worker.adapted.model.save_pretrained(str(folder))
    elif (stacked := _stacked_update(fold_log, adapter)) is not None:
        _save_lora(worker, stacked | {k: v for k, v in adapter.items() if k.role not in LORA_ROLES}, folder)
    else:
        merged = copy.deepcopy(worker.adapted.model).merge_and_unload()
        merged.save_pretrained(str(folder))
    describe(worker, folder, summary or {})
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
    model = build_peft_model(
        cfg.model, lora_cfg, labels=worker.data.splits.label_names, seed=cfg.seed, task=worker.task
    )
    lora.write(lora.adapter_parameters(model), tensors)
    model.save_pretrained(str(folder))


# -- what makes an export describe itself ------------------------------------------------------
def describe(worker: Worker, folder: Path, summary: dict[str, Any]) -> None:
    """Tokenizer, labels, fedlora.json, the model card; the adapter config's task type and portable base."""
    cfg = worker.cfg
    labels = list(worker.data.splits.label_names)
    worker.data.tokenizer.save_pretrained(str(folder))
    write_json(folder / LABELS, labels)
    base = cfg.model.hub_id or resolve_path(cfg.model.path)
    if (folder / ADAPTER_CONFIG).is_file():
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        config |= {
            "task_type": worker.task.peft_task_type,
            "base_model_name_or_path": base if cfg.model.pretrained else None,
        }
        write_json(folder / ADAPTER_CONFIG, config)
        # A packaged copy of the hub's files resolves the hub id offline. Not a GGUF conversion: its weights are
        # a 4-bit round trip of the hub's, so the cache must not pass them off as the hub's.
        if (
            cfg.model.pretrained
            and cfg.model.hub_id
            and cfg.model.path.startswith("package:")
            and not cfg.model.gguf_file
        ):
            register_in_hf_cache(cfg.model.hub_id, Path(resolve_path(cfg.model.path)))
    meta = {
        "fedlora": __version__,
        "task": cfg.task,
        "model": dataclasses.asdict(cfg.model),
        "seed": cfg.seed,
        "labels": labels,
        "export": "lora" if (folder / ADAPTER_CONFIG).is_file() else "merged",
        "run": {k: v for k, v in cfg.to_flat().items() if not k.startswith(("simulation.", "server."))},
        "summary": summary,
    }
    write_json(folder / FEDLORA, meta)
    model_card(meta, base).save(folder / "README.md")


def model_card(meta: dict[str, Any], base: str):
    """A model card (``huggingface_hub.ModelCard``) of an export's ``fedlora.json``."""
    from huggingface_hub import ModelCard, ModelCardData

    run, summary, labels = meta["run"], meta["summary"], meta["labels"]
    privacy = "none"
    if run.get("privacy.name") in ("dp", "user"):
        spent = summary.get("epsilon_spent")
        user = run.get("privacy.name") == "user"
        level = "user-level DP-FedAvg (all of a client's data)" if user else "sample-level DP-SGD"
        privacy = f"{level}, epsilon target {run.get('privacy.epsilon') or '-'}"
        privacy += (
            f", spent {'' if user else 'at most '}{spent:.3g}{'' if user else ' (max client)'}"
            if spent is not None
            else ""
        )
        if run.get("privacy.unsafe_seeded_randomness"):
            privacy += " (NOT PRIVATE: seeded noise)"
    accuracy = summary.get("test_accuracy")
    result = f"Final test accuracy: {f'{accuracy:.4f}' if accuracy is not None else 'not evaluated'}"
    if "partition" in summary:  # a client's own model (FedSA-LoRA), written by its node
        own = summary.get("personal_accuracy")
        result = (f"Client {summary['partition']}'s own model: the shared adapter with this client's personal "
                  f"tensors, which never left it. Accuracy on its own test shard ({summary.get('test_examples')} "
                  f"texts): {f'{own:.4f}' if own is not None else 'not evaluated'}")  # fmt: skip
    pretrained = meta["model"]["pretrained"]
    mean_pooled = meta["model"].get("pooling", "cls") == "mean"
    load = (
        "from fedlora.outputs.export import load_exported\nmodel = load_exported('{folder}')  # base, labels and head\n"
        if meta["export"] == "lora" or mean_pooled
        else "from transformers import AutoModelForSequenceClassification\n"
        "model = AutoModelForSequenceClassification.from_pretrained('{folder}')\n"
    )
    auto = (
        "\nWith peft alone (the head has its own size, so give it):\n\n```python\n"
        "from peft import AutoPeftModelForSequenceClassification\n"
        f"model = AutoPeftModelForSequenceClassification.from_pretrained('{{folder}}', num_labels={len(labels)})\n```\n"
        if meta["export"] == "lora" and pretrained and not mean_pooled
        else ""
    )
    if mean_pooled:
        auto = (
            "\nThe head reads the mean of the token states (model.pooling=mean), not the [CLS] pooler that "
            "transformers' own classes build: load it with `load_exported`, which sets the pooling.\n"
        )
    data = ModelCardData(
        library_name="peft" if meta["export"] == "lora" else "transformers",
        base_model=base if pretrained else None,
        tags=["fedlora", "federated-learning", "lora", "text-classification"],
    )
    if not pretrained:
        base = f"a random init of {meta['model']['name']}'s config, seed {meta['seed']} (fedlora.json rebuilds it)"
    text = f"""---
{data.to_yaml()}
---

# {run.get("strategy.name")} on {run.get("data.name")}: a federated LoRA model

Trained with fedlora {meta["fedlora"]}: strategy `{run.get("strategy.name")}`, {run.get("rounds")} rounds,
{run.get("clients")} clients ({run.get("clients_per_round")} per round), data `{run.get("data.name")}`
(partition `{run.get("partition.name")}`), model `{meta["model"]["name"]}` (base: `{base}`), LoRA rank
{run.get("lora.rank")} on {run.get("lora.target_modules")}. Privacy: {privacy}.

{result}; labels: {", ".join(labels)}.

## Use it

```python
{load.format(folder="<this folder>")}```
{auto.format(folder="<this folder>")}
Or from the command line: `fedlora predict --adapter <this folder> "some text"`.
"""
    return ModelCard(text)


def register_in_hf_cache(hub_id: str, folder: Path, *, cache_dir: Path | None = None) -> Path:
    """Make ``hub_id`` resolve offline to ``folder`` (a packaged copy of it) in the Hugging Face cache.

    Links the folder's files into a snapshot of the repo, as a download would have laid
    them out; a repo the cache already holds is left alone. Returns the snapshot folder.
    """
    from huggingface_hub import constants

    repo = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"
    if (repo / "refs" / "main").is_file():
        return repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
    revision = "fedlora-packaged-copy"
    snapshot = repo / "snapshots" / revision
    for path in folder.rglob("*"):
        if path.is_file():
            target = snapshot / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(path.resolve())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


# -- loading ------------------------------------------------------------------------------------
def load_exported(folder: str | Path, *, base: nn.Module | None = None) -> nn.Module:
    """An export as a ready model: a merged model, or the adapter on ``base`` (default: rebuilt from fedlora.json)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        meta = json.loads((folder / FEDLORA).read_text()) if (folder / FEDLORA).is_file() else {}
        if meta.get("task") == "causal_lm":
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(str(folder))
        merged = AutoModelForSequenceClassification.from_pretrained(str(folder))
        return use_pooling(merged, meta.get("model", {}).get("pooling", "cls"))
    with quiet_load():
        return PeftModel.from_pretrained(base if base is not None else rebuild_base(folder), str(folder))


@contextlib.contextmanager
def quiet_load() -> Iterator[None]:
    """transformers' load report off while an export's base is rebuilt: it calls the head "MISSING ... newly
    initialized", and the adapter's saved head replaces it next. The caller's verbosity is restored."""
    import transformers

    verbosity, bar = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            transformers.logging.enable_progress_bar()


def rebuild_base(folder: Path) -> nn.Module:
    """The base model an export was trained on, with its head for the export's labels (from fedlora.json)."""
    from fedlora.learning.model import model_folder
    from fedlora.learning.tasks import task_for

    meta = json.loads((Path(folder) / FEDLORA).read_text())
    model = ModelConfig(**meta["model"])
    task = task_for(meta.get("task", "classification"))
    with torch.random.fork_rng(devices=[]):  # a random init draws as the run did
        torch.manual_seed(meta["seed"])
        base = task.build(
            model_folder(model), labels=tuple(meta["labels"]), pretrained=model.pretrained,
            architecture=model.architecture,
        )  # fmt: skip
    return use_pooling(base, model.pooling)


__all__ = ["export_adapter", "load_exported", "rebuild_base", "register_in_hf_cache"]
