"""The Flower App's run config: the Hydra config in flat form, and back.

``flwr run`` starts from ``[tool.flwr.app.config]`` in pyproject.toml and fuses
the user's ``--run-config`` onto it; Flower refuses a key that the section does
not list, so the section lists every key of :func:`app_defaults` (a test keeps
the two equal; ``fedlora deploy config`` prints the section).

The mapping, one rule each way:

* a Hydra group choice ``strategy=fedsvd`` is the key ``strategy.name = "fedsvd"``
  (likewise ``model``, ``data``, ``partition``, ``privacy``);
* any other Hydra key is the same dotted key: ``train.lr=5e-3`` is
  ``train.lr = 5e-3``; null is ``""`` and a list is ``"query,value"``. The
  strategies' own keys (``strategy.alpha``, ``strategy.init_source``...) default
  to ``""``: the chosen strategy's default.

The apps rebuild the :class:`RunConfig` by composing ``conf/`` with Hydra
(:func:`from_run_config`): the ``<group>.name`` keys choose the presets, and each
other key whose value differs from its default here is applied on top. So a key
left at its default takes the preset's value (``model.name = "tiny"`` brings the
tiny model's ``pretrained = false``). A key that some preset sets (``train.batch_size``,
which ``model=tiny`` makes 32) defaults to ``""``, the chosen preset's value: Flower fuses
a run config onto the defaults, so a value equal to the default could not be told from
none, and ``train.batch_size = 16`` beside ``model.name = "tiny"`` would be lost.
``simulation.*`` keys are simulation-only and not part of the App's config.

Both apps, simulated and deployed, read their config this one way. (Not ``RunConfig.from_flat``:
a Flower user's run config names presets, whose defaults only Hydra knows, so the apps compose
instead, once per process.)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.config.cache import digest, json_once
from fedlora.config.compose import compose, group_options
from fedlora.config.run import ConfigError, Flat, RunConfig

PRESET_GROUPS = ("strategy", "model", "data", "partition", "privacy")  # the groups chosen by `<group>.name`
SIMULATION_ONLY = ("simulation.",)


def _app_keys(flat: Mapping[str, Any]) -> Flat:
    return {k: v for k, v in flat.items() if not k.startswith(SIMULATION_ONLY)}


# What a preset needs beside its name to compose at all (validation), for reading the keys it sets.
_TO_COMPOSE = {"data": ["data.path=preset-keys"], "privacy": ["privacy.epsilon=1"]}


@functools.cache
def preset_keys() -> frozenset[str]:
    """Keys (other than ``<group>.name``) that some preset of a group sets to another value than the default
    run's: their App default is ``""``, the chosen preset's value."""
    base = _app_keys(compose([])[0].to_flat())
    keys: set[str] = set()
    for group in PRESET_GROUPS[1:]:  # strategy: its keys default to "" already
        for option in group_options(group):
            try:
                cfg, _ = compose([f"{group}={option}"])
            except ConfigError:
                cfg, _ = compose([f"{group}={option}", *_TO_COMPOSE.get(group, [])])
            keys |= {k for k, v in _app_keys(cfg.to_flat()).items() if k in base and v != base[k]}
    return frozenset(keys - {"data.path", "privacy.epsilon"} - {f"{g}.name" for g in PRESET_GROUPS})


@functools.cache
def chosen_keys() -> frozenset[str]:
    """Keys whose App default ``""`` means "as the rest of the config chooses": a preset's value
    (:func:`preset_keys`), a null the RunConfig resolves from the strategy and the privacy, or the chosen
    strategy's own default (every strategy's keys, so that `flwr run` accepts them whichever is chosen)."""
    keys = set(preset_keys()) | {"train.lr", "strategy.weighting", "train.logit_adjustment", "server.multi_krum"}
    for name in group_options("strategy"):
        other, _ = compose([f"strategy={name}"])
        keys |= {k for k in other.to_flat() if k.startswith("strategy.") and k != "strategy.name"}
    return frozenset(keys)


@functools.cache
def _defaults() -> tuple[tuple[str, Any], ...]:
    """The App's defaults, derived once per set of sources (``conf/``, the config schema, the strategies)
    and read from the cache after: a deployed SuperNode starts a ClientApp process per message."""
    return tuple((k, v) for k, v in json_once("app-defaults", _sources_digest(), _derive_defaults))


def _derive_defaults() -> list[tuple[str, Any]]:
    cfg, _ = compose([])
    return list((_app_keys(cfg.to_flat()) | dict.fromkeys(sorted(chosen_keys()), "")).items())


def _sources_digest() -> str:
    """What the defaults are derived from: every file of ``conf/`` and the sources of config/ and strategies/."""
    conf, strategies = (Path(str(importlib.resources.files(name))) for name in ("conf", "strategies"))
    files = [p for p in conf.rglob("*") if p.is_file() and p.suffix in (".yaml", ".py")]
    files += [*Path(__file__).parent.glob("*.py"), *strategies.glob("*.py")]
    return digest([p.resolve() for p in files], Path("/"))


def app_defaults() -> Flat:
    """The App's run config defaults: ``[tool.flwr.app.config]``, flat."""
    return dict(_defaults())


@functools.cache
def _list_keys() -> frozenset[str]:
    """Flat keys of list-valued fields (carried as "a,b" strings)."""
    keys: set[str] = set()

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif isinstance(value, (list, tuple)):
                keys.add(f"{prefix}{f.name}")

    walk(compose([])[0], "")
    return frozenset(keys)


def to_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """Hydra overrides for a Flower run config (see the module's mapping)."""
    defaults = app_defaults()
    unknown = sorted(set(run_config) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown run config key(s) {unknown[:5]}; see [tool.flwr.app.config] in pyproject.toml")
    overrides = [f"{g}={run_config.get(f'{g}.name', defaults[f'{g}.name'])}" for g in PRESET_GROUPS]
    for key, value in run_config.items():
        group = key.split(".", 1)[0]
        if (key == f"{group}.name" and group in PRESET_GROUPS) or value == defaults[key]:
            continue
        overrides.append(f"{key}={_hydra_value(key, value)}")
    return overrides


def _hydra_value(key: str, value: Any) -> str:
    if value == "":
        return "null"
    if key in _list_keys():
        return "[" + ",".join(hydra_quote(v) for v in str(value).split(",") if v) + "]"
    if isinstance(value, str):
        return hydra_quote(value)
    return str(value).lower() if isinstance(value, bool) else repr(value)


def hydra_quote(value: str) -> str:
    """``value`` as a Hydra quoted string that parses back to exactly ``value``.

    Hydra keeps backslashes literal (no JSON escapes: a tab stays a tab) except a run of
    them before a quote or the closing quote, which is doubled; the quote itself is escaped.
    """
    body = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', value)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    return f'"{body}"'


@functools.lru_cache(maxsize=8)
def _from_items(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return compose(to_overrides(dict(items)))[0]


def from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The RunConfig a Flower run config stands for (composed once per process and config)."""
    return _from_items(tuple(sorted(run_config.items())))


def run_config_for(cfg: RunConfig) -> Flat:
    """The run config overrides that make the apps rebuild ``cfg``: its keys that differ from the defaults.

    Raises ConfigError for the rare ``cfg`` the mapping cannot carry (a key set back to
    the App's default where the chosen preset differs, or a key the App does not list).
    """
    defaults = app_defaults()
    flat = _app_keys(cfg.to_flat())
    out: Flat = {f"{g}.name": flat[f"{g}.name"] for g in PRESET_GROUPS if flat[f"{g}.name"] != defaults[f"{g}.name"]}
    late = chosen_keys()
    out |= {k: v for k, v in flat.items() if k in defaults and k not in late and v != defaults[k]}
    # Then the chosen keys the rest would not give. The rest alone may be refused (Fed-SB at user level needs
    # its strategy.init_source): then with the strategy's keys, and failing that every chosen key that is set.
    own = {k: v for k, v in flat.items() if k.startswith("strategy.") and k in late and v != defaults.get(k)}
    given: Flat | None = None
    for first in (out, out | own):
        try:
            given = _app_keys(from_run_config(defaults | first).to_flat())
        except ConfigError:
            continue
        out = first
        break
    out |= {k: v for k, v in flat.items() if k in late and k in defaults
            and (not _same(v, given.get(k)) if given is not None else v != defaults[k])}  # fmt: skip
    rebuilt = _app_keys(from_run_config(defaults | out).to_flat())
    differ = sorted(k for k in flat.keys() | rebuilt.keys() if not _same(flat.get(k), rebuilt.get(k)))
    if differ:
        raise ConfigError(f"the Flower run config cannot carry this setting of {differ[:5]}; leave it at the preset's")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def toml_section() -> str:
    """``[tool.flwr.app.config]`` for pyproject.toml, one group per table."""
    import tomli_w

    nested: dict[str, Any] = {}
    for key, value in app_defaults().items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    top = {k: v for k, v in nested.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in nested.items() if isinstance(v, dict)}
    return tomli_w.dumps({"tool": {"flwr": {"app": {"config": top | tables}}}})
