"""The base model with LoRA injected by peft."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from fedlora.groups import ConfigError, LoraConfig, ModelConfig
from fedlora.task import TASK

_PACKAGE = "package:"


def resolve_path(path: str) -> str:
    """``package:<module>/<folder>`` -> the folder inside the installed package; else unchanged."""
    if not path.startswith(_PACKAGE):
        return path
    module, _, folder = path[len(_PACKAGE) :].partition("/")
    try:
        root = importlib.resources.files(module)
    except ModuleNotFoundError:
        raise ConfigError(f"model.path {path!r}: the package {module!r} is not installed") from None
    return str(Path(str(root)) / folder)


def build_peft_model(model: ModelConfig, lora: LoraConfig, *, labels: tuple[str, ...], seed: int) -> PeftModel:
    """Base model + LoRA adapter named ``default``; head modules are peft's modules_to_save.

    Built under a fixed torch seed: transformers and peft draw their initial values
    (a new head, LoRA's A, a random base) from torch's global generator and take no
    generator argument, so seeding it here makes every process build bit-identical
    initial weights. The caller's generator state is restored afterwards.
    """
    path = resolve_path(model.path)
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        raise ConfigError(
            f"model.path {model.path!r} is not a folder (give a local model folder, a hub id, "
            "or package:<module>/<folder>)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            base = TASK.build(path, labels=labels, pretrained=model.pretrained, architecture=model.architecture)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.path {model.path!r} cannot be loaded: {str(err).splitlines()[0]}") from None
        peft_config = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            modules_to_save=TASK.heads(base) or None,
        )
        try:
            return get_peft_model(base, peft_config)
        except ValueError as err:
            raise ConfigError(f"lora.target_modules: {str(err).splitlines()[0]}") from None


def device_for_worker() -> torch.device:
    """CUDA when this process sees a GPU (Ray sets CUDA_VISIBLE_DEVICES per actor), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
