"""The flat form of a config: scalars only under dotted keys, what Flower's run config can carry.

Lists travel as "a,b", null as "" (Flower has no null); :func:`unflatten` reads them back by
each field's type, so ``RunConfig.from_flat(cfg.to_flat()) == cfg`` (a test keeps it so).
"""

# OmegaConf's structured configs understand typing.Optional/List/Dict, not PEP 604/585.
# ruff: noqa: UP006, UP007, UP035

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Dict, List

Flat = Dict[str, typing.Union[bool, int, float, str]]

_LIST_SEP = ","


def flatten(obj: Any, prefix: str = "") -> Flat:
    flat: Flat = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            flat.update(flatten(value, f"{key}."))
        elif isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, (list, tuple)):
            flat[key] = _LIST_SEP.join(str(v) for v in value)
        elif value is None:
            flat[key] = ""  # Flower has no null; "" is read back as None for Optional fields
        else:
            flat[key] = value
    return flat


def unflatten(cls: type, flat: dict[str, Any], prefix: str = "", *, mappings: tuple[str, ...] = ()) -> Any:
    """``cls`` built from ``flat``'s dotted keys under ``prefix``; a field named in ``mappings`` (at the top)
    takes its own sub-keys as a mapping (the strategy's config, built by its class)."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        origin = typing.get_origin(hint)
        if (f.name in mappings and not prefix) or origin in (dict, Dict):  # a mapping of its own keys
            if sub := {k[len(key) + 1 :]: v for k, v in flat.items() if k.startswith(f"{key}.")}:
                kwargs[f.name] = sub
        elif dataclasses.is_dataclass(hint):
            kwargs[f.name] = unflatten(hint, flat, f"{key}.")
        elif key in flat:
            kwargs[f.name] = _value(hint, flat[key])
    return cls(**kwargs)


def _value(hint: Any, value: Any) -> Any:
    """A flat value as the field's type: "" is None for optional fields, "a,b" a list."""
    origin = typing.get_origin(hint)
    optional = origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional and value in ("", None):
        return None
    if origin in (list, List):
        return [v for v in str(value).split(_LIST_SEP) if v]
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    return _coerce(base, value)


def _coerce(kind: Any, value: Any) -> Any:
    if kind is bool and isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return kind(value) if kind in (int, float, str, bool) else value
