"""Shared fixtures: configs composed exactly as the CLI composes them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fedlora.config.compose import compose
from fedlora.config.run import RunConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Small and fast: the tiny random BERT on a small synthetic set.
# One Ray worker: a tiny model gains nothing from two, and each worker imports torch, transformers and peft
# (7 s of CPU per run on the two cores the tests share)
TINY = ["model=tiny", "data.synthetic_train=200", "data.synthetic_test=64", "train.local_steps=2", "train.batch_size=8",
        "simulation.parallel_clients=1"]  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the groups into node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests sharing a module-scoped fixture form one pytest-xdist group: the fixture is then computed once a
    run, not once on each worker that runs one of them (a two-run simulation was computed twice: 94 s lost)."""
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)  # pytest keeps a test's fixture definitions there
        if defs is None or item.get_closest_marker("xdist_group") is not None:
            continue
        shared = sorted(name for name, d in defs.name2fixturedefs.items() if d[-1].scope == "module")
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.path.stem}.{shared[0]}"))


@pytest.fixture(autouse=True, scope="session")
def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # pytest-xdist: share the cores between the workers instead of oversubscribing them
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


@pytest.fixture
def make_config() -> Callable[..., RunConfig]:
    """make_config("clients=4", ...) -> RunConfig with the tiny model and small data."""

    def make(*overrides: str) -> RunConfig:
        cfg, _ = compose([*TINY, *overrides])
        return cfg

    return make
