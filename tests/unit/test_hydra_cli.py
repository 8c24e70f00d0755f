"""Hydra's command line as Hydra users know it: --cfg job, ~ and + overrides, hydra.* keys, multirun jobs."""

from __future__ import annotations

import pytest
import yaml

from fedlora.cli import main
from fedlora.commands.multirun import jobs
from fedlora.config.compose import compose
from fedlora.config.run import ConfigError
from tests.conftest import TINY


def test_cfg_job_prints_the_composed_config(capsys) -> None:
    assert main(["simulate", "--cfg", "job", "model=tiny", "rounds=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["name"] == "tiny" and printed["rounds"] == 7


def test_tilde_puts_a_key_back_to_its_default_and_removes_a_mapping_s_key() -> None:
    cfg, _ = compose(["model=tiny", "~model.architecture.num_hidden_layers", "lora.dropout=0.3", "~lora.dropout"])
    assert "num_hidden_layers" not in cfg.model.architecture and cfg.lora.dropout == 0.0
    with pytest.raises(ConfigError, match=r"~lora\.nope: no such config key"):
        compose(["~lora.nope"])


@pytest.mark.parametrize(
    ("override", "message"),
    [("+foo=1", "unknown config key 'foo'"), ("+train.foo=1", "unknown config key 'train.foo'"),
     ("hydra.verbose=true", "hydra.verbose is not supported")],
)  # fmt: skip
def test_plus_is_validated_like_any_key_and_other_hydra_keys_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose([override])
    cfg, _ = compose(["+train.lr=0.02"])  # + on a known key sets it
    assert cfg.train.lr == 0.02


def test_multirun_jobs_are_the_product_of_the_swept_values_in_hydra_s_order() -> None:
    assert jobs(["strategy=fedavg,fedsvd", "train.lr=1e-3,5e-3", "rounds=2"]) == [
        ["strategy=fedavg", "train.lr=0.001", "rounds=2"],
        ["strategy=fedavg", "train.lr=0.005", "rounds=2"],
        ["strategy=fedsvd", "train.lr=0.001", "rounds=2"],
        ["strategy=fedsvd", "train.lr=0.005", "rounds=2"],
    ]


@pytest.mark.slow
def test_multirun_over_two_values_of_two_keys_runs_four_jobs_and_a_summary(tmp_path) -> None:
    run = [*TINY, "clients=2", "clients_per_round=2", "rounds=1", "data.synthetic_test=16"]
    sweep = ["strategy=fedavg,ffa_lora", "train.lr=0.001,0.01", f"hydra.sweep.dir={tmp_path}"]
    assert main(["simulate", "-m", *run, *sweep]) == 0
    for job in range(4):
        assert (tmp_path / str(job) / "adapter" / "adapter_config.json").is_file()
        assert (tmp_path / str(job) / ".hydra" / "overrides.yaml").is_file()
    summary = (tmp_path / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| job")]
    assert len(rows) == 4, summary
    assert rows[0].startswith("| 0 | `strategy=fedavg train.lr=0.001` |")
    assert rows[3].startswith("| 3 | `strategy=ffa_lora train.lr=0.01` |")
    assert len(yaml.safe_load((tmp_path / "multirun.yaml").read_text())["jobs"]) == 4


@pytest.mark.slow
def test_hydra_run_dir_is_the_run_s_folder_with_its_hydra_folder(tmp_path) -> None:
    out = tmp_path / "here"
    assert main(["simulate", *TINY, "clients=2", "rounds=1", "data.synthetic_test=16", f"hydra.run.dir={out}"]) == 0
    assert (out / "metrics.csv").is_file() and (out / ".hydra" / "config.yaml").is_file()
    assert f"hydra.run.dir={out}" in yaml.safe_load((out / ".hydra" / "overrides.yaml").read_text())


def test_a_multirun_over_seeds_summarises_each_setting_with_its_interval() -> None:
    from fedlora.commands.multirun import over_seeds

    plan = jobs(["strategy=fedavg,fed_sb", "seed=0,1,2", "rounds=2"])
    swept = [0, 1]
    finals = {0: 0.80, 1: 0.82, 2: 0.81, 3: 0.70, 4: None, 5: 0.72}  # job 4 left no accuracy
    rows = over_seeds(plan, swept, finals)
    # fedavg: 0.80, 0.82, 0.81 -> 0.810 ± 4.303 x 0.01 / sqrt(3) = 0.025; fed_sb: two seeds -> n = 2
    assert "| `strategy=fedavg` | 0.810 ± 0.025 | 3 |" in rows
    assert any(r.startswith("| `strategy=fed_sb` | 0.710 ± ") and r.endswith("| 2 |") for r in rows)
    assert over_seeds(jobs(["strategy=fedavg,fed_sb"]), [0], {0: 0.8, 1: 0.7}) == []  # no seed axis: no rows
