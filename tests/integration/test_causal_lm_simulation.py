"""Every strategy, and DP-SGD, on a causal LM (the tiny Llama): 2-round runs of the real ServerApp and ClientApp.

FedAvg and the DP run go through Flower's simulation engine (Ray), as users run them; the
other strategies call the same apps in-process (:class:`tests.local_grid.LocalGrid`), which
saves a Ray start per strategy and tests the same rounds.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.config.compose import compose
from strategies import STRATEGIES
from tests.local_grid import run_in_process

pytestmark = pytest.mark.slow

RUN = [
    "model=tiny_llama", "data.synthetic_train=40", "data.synthetic_test=8", "clients=2", "clients_per_round=2",
    "rounds=2", "train.max_seq_len=96", "train.batch_size=4", "train.local_steps=1", "train.eval_batch_size=16",
    "simulation.parallel_clients=1",  # one Ray worker (tests/conftest.py TINY says why)
]  # fmt: skip


def rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_fine_tunes_a_causal_lm(strategy: str, tmp_path: Path) -> None:
    if strategy == "fedavg":
        assert main(["simulate", *RUN, f"strategy={strategy}", f"output_dir={tmp_path}"]) == 0
    else:
        run_in_process(compose([*RUN, f"strategy={strategy}", f"output_dir={tmp_path}"])[0])
    table = rows(tmp_path)
    assert [r["replies_received"] for r in table[1:]] == ["2", "2"]
    assert all(r["test_accuracy"] and float(r["test_perplexity"]) > 1 for r in table)
    assert all(0 <= float(r["personal_worst10"]) <= float(r["personal_accuracy"]) <= 1 for r in table)  # ranking
    assert (tmp_path / "adapter" / "fedlora.json").is_file()
    if strategy == "fedsa_lora":  # each node's own model (its B) as an export, loadable as any
        assert all((tmp_path / "personal" / f"partition_{k}" / "adapter_model.safetensors").is_file() for k in (0, 1))


def test_free_text_records_have_no_personalised_accuracy(tmp_path: Path) -> None:
    """Instruction records without labels: the accuracy a causal LM reports ranks labels, so there is none."""
    records = tmp_path / "records.jsonl"
    records.write_text("".join(f'{{"instruction": "Count to {k}", "input": "", "output": "{k}"}}\n' for k in range(30)))
    run = [*RUN, "data=files", f"data.path={records}", "data.test_fraction=0.2", f"output_dir={tmp_path / 'out'}"]
    run_in_process(compose(run)[0])
    table = rows(tmp_path / "out")
    assert all(float(r["test_perplexity"]) > 1 for r in table) and "personal_accuracy" not in table[0]


def test_dp_sgd_on_a_causal_lm_stays_within_its_budget(tmp_path: Path) -> None:
    assert main(["simulate", *RUN, "strategy=ffa_lora", "privacy=dp", "privacy.epsilon=3",
                 "privacy.max_physical_batch_size=2", f"output_dir={tmp_path}"]) == 0  # fmt: skip
    table = rows(tmp_path)
    assert all(0 < float(r["epsilon_max"]) <= 3 for r in table[1:]) and all(r["train_loss"] == "" for r in table)
