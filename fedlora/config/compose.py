"""Hydra composition of ``conf/`` into a validated RunConfig, for the CLI and the apps alike."""

from __future__ import annotations

import importlib.resources
import math
from typing import Any

from fedlora.config.resolve import resolve
from fedlora.config.run import ConfigError, RunConfig, register_schema

GROUPS = ("strategy", "model", "data", "partition", "lora", "train", "privacy", "server", "simulation")


def group_options(group: str) -> list[str]:
    folder = importlib.resources.files("conf") / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


HYDRA_KEYS = ("hydra.run.dir", "hydra.sweep.dir")  # the hydra.* settings fedlora honours (the CLI reads them)


def _refuse_meaningless(cfg: RunConfig, overrides: list[str]) -> None:
    """Settings that would silently mean nothing: a non-finite number, DP keys in a run without DP."""
    for key, value in cfg.to_flat().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    keys = [k for o in overrides if (k := o.partition("=")[0].lstrip("+")).startswith("privacy.")]
    if not cfg.privacy.any and keys:
        raise ConfigError(
            f"{keys[0]} has no effect: this run is not private; add privacy=dp or privacy=user (or drop {keys[0]})"
        )
    other = USER_ONLY if cfg.privacy.enabled else SAMPLE_ONLY if cfg.privacy.user_level else ()
    for key in keys:
        if key.removeprefix("privacy.") in other:
            raise ConfigError(f"{key} has no effect under privacy={cfg.privacy.name} (it belongs to the other level)")


SAMPLE_ONLY = ("max_grad_norm", "grad_sample_mode", "poisson", "max_physical_batch_size", "public_counts")
USER_ONLY = ("clip_norm", "adaptive_clip", "target_quantile", "clip_lr", "clip_count_stddev")


def compose(overrides: list[str]) -> tuple[RunConfig, Any]:
    """(typed RunConfig, composed DictConfig) for ``overrides``; bad input raises ConfigError.

    Hydra's override grammar: ``key=value``; ``+key=value`` (validated like any key:
    an unknown key is an error, as without the +); ``~key`` puts a key back to its
    default (a key of a mapping such as ``model.architecture`` is removed). ``hydra.*``
    keys other than :data:`HYDRA_KEYS` are refused; those are the CLI's.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    kept, removed = [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key.startswith("hydra."):
            if key not in HYDRA_KEYS:
                raise ConfigError(f"{key} is not supported; fedlora honours {list(HYDRA_KEYS)} and -v (verbose logs)")
            continue
        if key.startswith("~"):
            removed.append(key[1:])
            continue
        if not sep:
            raise ConfigError(f"expected key=value, got {item!r}")
        name = key.lstrip("+")
        if name in GROUPS and value not in (options := group_options(name)):
            raise ConfigError(f"unknown {name} {value!r}; choose from {options}")
        kept.append(item)
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="conf", version_base=None):
            composed = hydra_compose(config_name="config", overrides=kept)
        for key in removed:
            _remove(composed, key)
        _refuse_unknown(composed)
        cfg = resolve(OmegaConf.to_object(composed))
        _refuse_meaningless(cfg, kept)
        return cfg, composed
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_hydra_message(err)) from None


def _remove(composed: Any, key: str) -> None:
    """``~key``: a mapping's key is removed; any other key goes back to its dataclass default."""
    from omegaconf import OmegaConf, open_dict

    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(composed, parent_key) if parent_key else composed
    if parent is None or leaf not in parent:
        raise ConfigError(f"~{key}: no such config key")
    if parent_key in MAPPINGS:
        with open_dict(parent):
            del parent[leaf]
        return
    defaults = _schema_defaults(composed)
    if key not in defaults:
        raise ConfigError(f"~{key}: no default to go back to")
    OmegaConf.update(composed, key, defaults[key], merge=False)


MAPPINGS = ("model.architecture",)  # config keys whose own keys are free (a model's architecture overrides)


def _schema_defaults(composed: Any) -> dict[str, Any]:
    """Every scalar key's dataclass default, the chosen strategy's config included (flat, dotted)."""
    import dataclasses

    from fedlora.config.flat import flatten
    from strategies import get_strategy_class

    strategy_cls = get_strategy_class(str(composed.strategy.name)).config_class
    strategy = strategy_cls(name=str(composed.strategy.name))
    flat = flatten(RunConfig(strategy=strategy))
    return {k: (None if v == "" else v) for k, v in flat.items()} | {
        f"strategy.{f.name}": getattr(strategy, f.name) for f in dataclasses.fields(strategy)
    }


def _refuse_unknown(composed: Any) -> None:
    """A key the schema does not know (``+foo=1``, ``+train.foo=1``) is an error, not silently ignored."""
    from omegaconf import OmegaConf

    known = set(_schema_defaults(composed))
    found = {k for k in _flat_keys(OmegaConf.to_container(composed)) if not k.startswith(MAPPINGS)}
    unknown = sorted(found - known)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r} (see fedlora simulate --help)")


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            key = f"{prefix}{k}"
            out += _flat_keys(v, f"{key}.") if isinstance(v, dict) and key not in MAPPINGS else [key]
        return out
    return [prefix.rstrip(".")]


def _hydra_message(err: BaseException) -> str:
    """One line from Hydra's and OmegaConf's multi-line errors."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = err.__cause__ or err
    if isinstance(cause, ValidationError):
        return f"{cause.full_key}: {str(cause.msg).splitlines()[0]}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        return f"unknown config key {cause.full_key!r} (see fedlora simulate --help)"
    first = str(err).splitlines()[0]
    if first.startswith("LexerNoViableAltException: ") and "=" in first:  # spaces, accents, brackets in a value
        key, _, value = first.removeprefix("LexerNoViableAltException: ").partition("=")
        quoted = value.replace('"', '\\"')
        return (
            f'Hydra cannot read the value of {key}={value}: quote it, {key}="{quoted}" '
            f"(in a shell: '{key}=\"{quoted}\"')"
        )
    return first
