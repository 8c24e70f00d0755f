"""Adapter keys and roles: which tensor of which adapted module a name refers to.

peft names its parameters ``base_model.model.<module>.lora_A.<adapter>.weight``
and ``base_model.model.<module>.modules_to_save.<adapter>.<param>``. That
naming is parsed here, once, into an :class:`AdapterKey`; everything else
(strategies, wire format, checkpoints) picks tensors by ``key.role``, never by
substring.

Fed-SB trains an r x r matrix R between LoRA's A and B. :func:`insert_r` puts it
inside peft's ``lora_B`` (as an ``nn.Linear(r, r)``, which Opacus has a grad
sampler for), so peft's forward computes ``B(R(A x)) * s`` unchanged and its
parameter is named ``<module>.lora_B.<adapter>.R.weight``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn


class Role(str, Enum):
    """What a tensor is in the federated adapter."""

    A = "A"  # LoRA down-projection, (r, d_in)
    B = "B"  # LoRA up-projection, (d_out, r)
    R = "R"  # Fed-SB's square matrix between A and B, (r, r)
    DENSE = "dense"  # a fully trained module (peft's modules_to_save), e.g. a task head
    BASE = "base"  # an adapted module's base weight W0 (d_out, d_in): only its gradient travels (LoRA-SB init)


LORA_ROLES = frozenset({Role.A, Role.B, Role.R})

_LORA_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<role>[AB])\.(?P<adapter>[^.]+)\.(?P<param>\w+)$"
)
_R_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_B\.(?P<adapter>[^.]+)\.R\.(?P<param>\w+)$")
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
        elif m := _R_NAME.match(name):
            role = Role.R
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


# -- Fed-SB's R between A and B -------------------------------------------------------
class BWithR(nn.Module):
    """peft's ``lora_B`` with R in front: x (.., r) -> B (R x). ``weight`` is B (d_out, r).

    B keeps its peft name (``lora_B.<adapter>.weight``) and its Parameter; R is an
    ``nn.Linear(r, r, bias=False)`` initialised to the identity, so inserting it
    leaves the model's output unchanged.
    """

    def __init__(self, b: nn.Linear) -> None:
        super().__init__()
        if b.bias is not None:
            raise ValueError("Fed-SB's R needs LoRA without a bias on B")
        rank = b.in_features
        self.weight = b.weight
        self.R = nn.Linear(rank, rank, bias=False, device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            self.R.weight.copy_(torch.eye(rank, dtype=b.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.R(x), self.weight)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module path as in AdapterKey.module, peft LoRA layer) for every adapted module."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name.removeprefix("base_model.model."), module


def insert_r(model: nn.Module, *, adapter: str = "default") -> None:
    """Put an identity R between A and B of every LoRA layer (idempotent)."""
    for _, layer in lora_layers(model):
        if not isinstance(layer.lora_B[adapter], BWithR):
            layer.lora_B[adapter] = BWithR(layer.lora_B[adapter])


@contextmanager
def plain_lora(model: nn.Module, *, adapter: str = "default") -> Iterator[None]:
    """Within the block, every ``BWithR`` is a plain ``nn.Linear`` (a copy of B): what peft saves and loads."""
    swapped = []
    for _, layer in lora_layers(model):
        with_r = layer.lora_B[adapter]
        if isinstance(with_r, BWithR):
            d_out, rank = with_r.weight.shape
            plain = nn.Linear(rank, d_out, bias=False, device=with_r.weight.device, dtype=with_r.weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(with_r.weight)
            plain.weight.requires_grad_(with_r.weight.requires_grad)
            layer.lora_B[adapter] = plain
            swapped.append((layer, with_r))
    try:
        yield
    finally:
        for layer, with_r in swapped:
            layer.lora_B[adapter] = with_r


def base_weights(model: nn.Module) -> dict[AdapterKey, nn.Parameter]:
    """The base weight W0 (d_out, d_in) of every adapted module, keyed with ``Role.BASE``."""
    return {AdapterKey(name, Role.BASE): layer.get_base_layer().weight for name, layer in lora_layers(model)}


# -- heterogeneous ranks (FLoRA) ------------------------------------------------------
@dataclass(frozen=True)
class RankMask:
    """A client of rank ``rank`` trains the first ``rank`` of the model's ``model_rank`` LoRA directions.

    The one place heterogeneous ranks are applied: training masks the adapter before
    and after every step (:meth:`apply`) and sends its share (:meth:`view`); the server
    expects that share (:meth:`view` of where the client started). A full-rank mask does nothing.
    """

    rank: int
    model_rank: int

    @property
    def partial(self) -> bool:
        return self.rank < self.model_rank

    def apply(self, params: Mapping[AdapterKey, nn.Parameter]) -> None:
        if self.partial:
            mask_rank(params, self.rank)

    def view(self, tensors: Tensors) -> Tensors:
        return truncate_rank(tensors, self.rank) if self.partial else tensors


def truncate_rank(tensors: Tensors, rank: int) -> Tensors:
    """A rank-``rank`` client's share of a wider adapter: A's first rows, B's first columns."""
    out = {}
    for key, value in tensors.items():
        if key.role is Role.A:
            value = value[:rank]
        elif key.role is Role.B:
            value = value[:, :rank]
        out[key] = value.contiguous()
    return out


@torch.no_grad()
def mask_rank(params: Mapping[AdapterKey, nn.Parameter], rank: int) -> None:
    """Zero A's rows and B's columns beyond ``rank``: the adapter is then exactly rank ``rank``.

    Their gradients are then zero too (each is multiplied by the other's zeros), so
    plain optimisers keep them at zero; DP noise does not, hence the re-masking after
    every step.
    """
    for key, param in params.items():
        if key.role is Role.A:
            param[rank:].zero_()
        elif key.role is Role.B:
            param[:, rank:].zero_()


# -- folding low-rank updates into base weights (FLoRA, FedEx) ---------------------------
def fold(delta: Tensors, factors: Tensors, *, scaling: float) -> Tensors:
    """``delta`` plus s * B A for every (A, B) pair in ``factors``, keyed by the module's ``Role.BASE``.

    The product is taken in float64 and rounded once. The server and every node run
    this same function on the same factors in the same order, so they hold
    bit-identical deltas.
    """
    out = dict(delta)
    for key in sorted(k for k in factors if k.role is Role.A):
        a, b = factors[key], factors[AdapterKey(key.module, Role.B, key.param)]
        product = (scaling * (b.double() @ a.double())).to(a.dtype)
        base = AdapterKey(key.module, Role.BASE)
        out[base] = out[base] + product if base in out else product
    return out
