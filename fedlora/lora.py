"""Adapter keys and roles: which tensor of which adapted module a name refers to.

peft names its parameters ``base_model.model.<module>.lora_A.<adapter>.weight``
and ``base_model.model.<module>.modules_to_save.<adapter>.<param>``. That
naming is parsed here, once, into an :class:`AdapterKey`; everything else
(strategies, wire format, checkpoints) picks tensors by ``key.role``, never by
substring.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn


class Role(str, Enum):
    """What a tensor is in the federated adapter."""

    A = "A"  # LoRA down-projection, (r, d_in)
    B = "B"  # LoRA up-projection, (d_out, r)
    DENSE = "dense"  # a fully trained module (peft's modules_to_save), e.g. a task head


LORA_ROLES = frozenset({Role.A, Role.B})

_LORA_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<role>[AB])\.(?P<adapter>[^.]+)\.(?P<param>\w+)$"
)
_DENSE_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<param>\w+)$"
)
_SEP = "|"


@dataclass(frozen=True, order=True)
class AdapterKey:
    """One adapter tensor: ``module`` is the adapted module's path in the base model."""

    module: str
    role: Role
    param: str = "weight"

    def __str__(self) -> str:
        return _SEP.join((self.module, self.role.value, self.param))

    @classmethod
    def parse(cls, text: str) -> AdapterKey:
        """Inverse of ``str(key)``: the wire and checkpoint form."""
        parts = text.split(_SEP)
        if len(parts) != 3:
            raise ValueError(f"not an adapter key: {text!r}")
        module, role, param = parts
        return cls(module, Role(role), param)

    @classmethod
    def from_peft_name(cls, name: str, *, adapter: str = "default") -> AdapterKey | None:
        """Key of a peft parameter name, or None for a base-model parameter."""
        if m := _LORA_NAME.match(name):
            role = Role(m["role"])
        elif m := _DENSE_NAME.match(name):
            role = Role.DENSE
        else:
            return None
        if m["adapter"] != adapter:
            return None
        return cls(m["module"], role, m["param"])


Tensors = dict[AdapterKey, torch.Tensor]


def adapter_parameters(model: nn.Module, *, adapter: str = "default") -> dict[AdapterKey, nn.Parameter]:
    """The adapter's parameters of a peft model, sorted by key (a stable order)."""
    found = {}
    for name, param in model.named_parameters():
        key = AdapterKey.from_peft_name(name, adapter=adapter)
        if key is not None:
            found[key] = param
    if not any(k.role in LORA_ROLES for k in found):
        raise ValueError("the model has no LoRA parameters: check lora.target_modules")
    return dict(sorted(found.items()))


def read(params: Mapping[AdapterKey, nn.Parameter]) -> Tensors:
    """A detached CPU copy of the adapter tensors (what is sent or saved)."""
    return {k: p.detach().to("cpu", copy=True) for k, p in params.items()}


@torch.no_grad()
def write(params: Mapping[AdapterKey, nn.Parameter], tensors: Mapping[AdapterKey, torch.Tensor]) -> None:
    """Copy ``tensors`` into the matching parameters; every key must exist with its shape."""
    for key, value in tensors.items():
        if key not in params:
            raise KeyError(f"no adapter tensor {key} in the model")
        target = params[key]
        if target.shape != value.shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
        target.copy_(value)


def set_trainable(params: Mapping[AdapterKey, nn.Parameter], trainable: set[AdapterKey]) -> None:
    """requires_grad on exactly the ``trainable`` keys; frozen tensors get no gradient at all."""
    for key, param in params.items():
        param.requires_grad_(key in trainable)
