"""Hydra composition of ``conf/`` into a validated RunConfig, for the CLI and the apps alike."""

from __future__ import annotations

import importlib.resources
from typing import Any

from fedlora.config import ConfigError, RunConfig, register_schema

GROUPS = ("strategy", "model", "data", "partition", "lora", "train", "privacy", "server", "simulation")


def group_options(group: str) -> list[str]:
    folder = importlib.resources.files("conf") / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def compose(overrides: list[str]) -> tuple[RunConfig, Any]:
    """(typed RunConfig, composed DictConfig) for ``overrides``; bad input raises ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {item!r}")
        if key in GROUPS and value not in (options := group_options(key)):
            raise ConfigError(f"unknown {key} {value!r}; choose from {options}")
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="conf", version_base=None):
            composed = hydra_compose(config_name="config", overrides=overrides)
        return OmegaConf.to_object(composed), composed
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_hydra_message(err)) from None


def _hydra_message(err: BaseException) -> str:
    """One line from Hydra's and OmegaConf's multi-line errors."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = err.__cause__ or err
    if isinstance(cause, ValidationError):
        return f"{cause.full_key}: {str(cause.msg).splitlines()[0]}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        return f"unknown config key {cause.full_key!r} (see fedlora simulate --help)"
    return str(err).splitlines()[0]
