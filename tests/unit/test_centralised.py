"""The centralised reference: plain LoRA on the pooled data, as many optimizer steps as the federated run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.commands.centralised import overrides_for, run_centralised
from fedlora.config.compose import compose
from fedlora.learning import client_round
from fedlora.learning.model import set_threads
from fedlora.outputs.metrics import read_metrics
from tests.conftest import TINY


def test_it_takes_as_many_optimizer_steps_as_the_federated_run(tmp_path: Path, monkeypatch) -> None:
    federated = [*TINY, "clients=6", "clients_per_round=3", "rounds=2", "strategy=fed_sb", "privacy=dp",
                 "privacy.epsilon=3", "train.local_steps=4"]  # fmt: skip
    cfg, _ = compose(overrides_for(federated))
    assert cfg.strategy.name == "fedavg" and not cfg.privacy.enabled
    steps: list[int] = []
    real = client_round.train_steps

    def counting(*args, steps_=steps, **kwargs):
        steps_.append(kwargs["steps"])
        return real(*args, **kwargs)

    monkeypatch.setattr(client_round, "train_steps", counting)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_centralised(cfg, tmp_path)
        assert torch.get_num_threads() == 1  # simulation.num_cpus, what one client owns; not one per core
    finally:
        torch.set_num_threads(threads)
    assert steps == [3 * 4, 3 * 4]  # per round: clients per round x local steps; rounds: the federated run's
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["round"] for r in rows] == ["0", "1", "2"] and all(r["test_accuracy"] for r in rows)
    assert float(rows[2]["train_loss"]) > 0 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("env", "cpus", "expected"), [(None, 1.0, 1), (None, 2.5, 2), ("3", 1.0, 3), ("x", 2, 2)])
def test_threads_are_the_cpus_a_process_owns_or_what_the_user_set(monkeypatch, env, cpus, expected) -> None:
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    threads = torch.get_num_threads()
    try:
        assert set_threads(cpus) == expected == torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "given", [["strategy=flora", "strategy.client_ranks=[2,4]"], ["privacy=dp", "privacy.epsilon=1"]]
)
def test_strategy_and_privacy_are_replaced(given: list[str]) -> None:
    assert overrides_for([*given, "rounds=3"]) == ["rounds=3", "strategy=fedavg", "privacy=none"]
