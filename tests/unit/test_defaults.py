"""One source for every default: the config dataclasses. conf/'s default files and presets, the strategies'
own presets and pyproject.toml's Flower app config may repeat a value (for the reader) but never differ.

A drift here is a silent change of behaviour: anything that falls back to a dataclass (``~train.local_steps``,
a config built in code) would train otherwise than the composed default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from fedlora.cli import main
from fedlora.config.app import app_defaults
from fedlora.config.compose import compose
from fedlora.config.run import RunConfig
from strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def dataclass_default(cls: type, name: str) -> Any:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]


def same(preset: Any, default: Any) -> bool:
    if isinstance(default, (list, tuple)) and isinstance(preset, (list, tuple)):
        return list(default) == list(preset)
    return preset == default


def run_config_defaults() -> tuple[dict[str, Any], dict[str, str]]:
    """config.yaml's own keys, and its defaults list (group -> the preset chosen by default)."""
    data = yaml.safe_load((CONF / "config.yaml").read_text())
    chosen = {k: v for item in data.pop("defaults") if isinstance(item, dict) for k, v in item.items()}
    return data, chosen


def test_config_yaml_keys_are_the_run_config_defaults() -> None:
    own, _ = run_config_defaults()
    differ = {
        k: (v, dataclass_default(RunConfig, k)) for k, v in own.items() if not same(v, dataclass_default(RunConfig, k))
    }
    assert differ == {}


@pytest.mark.parametrize("group", ["data", "partition", "lora", "train", "privacy", "server", "simulation", "model"])
def test_each_group_s_default_preset_is_its_dataclass_defaults(group: str) -> None:
    """The preset config.yaml chooses for a group (``default``, ``synthetic``, ``iid``, ``none``, ``minilm``) sets
    nothing its dataclass does not already default to."""
    _, chosen = run_config_defaults()
    data = yaml.safe_load((CONF / group / f"{chosen[group]}.yaml").read_text()) or {}
    cls = type(dataclass_default(RunConfig, group))
    differ = {k: (v, dataclass_default(cls, k)) for k, v in data.items() if not same(v, dataclass_default(cls, k))}
    assert differ == {}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_s_preset_is_its_config_class_defaults(name: str) -> None:
    data = yaml.safe_load((CONF / "strategy" / f"{name}.yaml").read_text())
    config = STRATEGIES[name].config_class(name=name)
    differ = {k: (v, getattr(config, k)) for k, v in data.items() if not same(v, getattr(config, k))}
    assert differ == {}


def test_falling_back_to_the_dataclass_changes_nothing() -> None:
    """``~key`` returns a key to its dataclass default: for every key of the default run that is its value."""
    composed, _ = compose([])
    for key in ("train.local_steps", "train.batch_size", "lora.rank", "server.update_clip", "model.pooling"):
        back, _ = compose([f"~{key}"])
        assert back.to_flat()[key] == composed.to_flat()[key], key


def test_pyproject_app_config_sets_the_composed_defaults() -> None:
    """Each value pyproject.toml's [tool.flwr.app.config] gives ("" leaves the preset's) is the default run's."""
    flat = RunConfig.to_flat(compose([])[0])
    section = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    def walk(node: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out |= walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    given = {k: v for k, v in walk(section).items() if v != ""}
    differ = {k: (v, flat[k]) for k, v in given.items() if k in flat and str(v) != str(flat[k])}
    assert differ == {}
    assert set(given) <= set(app_defaults())


def test_help_and_cfg_job_show_the_same_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    shown = dict(
        re.findall(r"^\s+(train\.local_steps|train\.batch_size|lora\.rank)=(\S+)", capsys.readouterr().out, re.M)
    )
    assert main(["simulate", "--cfg", "job"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert shown == {
        "train.local_steps": str(job["train"]["local_steps"]),
        "train.batch_size": str(job["train"]["batch_size"]),
        "lora.rank": str(job["lora"]["rank"]),
    }
    assert job["train"]["local_steps"] == dataclass_default(type(dataclass_default(RunConfig, "train")), "local_steps")
