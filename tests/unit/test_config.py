"""The typed config: flat round trip, and one clear error for each kind of bad input."""

from __future__ import annotations

import os

import pytest

from fedlora.cli import main
from fedlora.config.compose import compose
from fedlora.config.run import ConfigError, RunConfig, build_strategy_config


def test_flat_round_trip_of_defaults() -> None:
    cfg, _ = compose([])
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_flat_round_trip_of_nulls_lists_dicts_and_fractions() -> None:
    cfg, _ = compose(
        [
            "model=tiny",
            "clients=7",
            "clients_per_round=0.3",
            "train.local_steps=null",
            "train.local_epochs=2",
            "lora.target_modules=[query,key,value]",
            "data.max_test_examples=50",
            "train.head=freeze",
            "simulation.ray_address=auto",
        ]
    )
    flat = cfg.to_flat()
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    back = RunConfig.from_flat(flat)
    assert back == cfg
    assert back.train.local_steps is None and back.train.local_epochs == 2
    assert back.lora.target_modules == ["query", "key", "value"]
    assert back.model.architecture["hidden_size"] == 32


@pytest.mark.parametrize(
    ("cpr", "clients", "expected"), [(10, 100, 10), (0.1, 100, 10), (0.5, 3, 2), (1, 5, 1), (0.01, 10, 1)]
)
def test_clients_per_round_is_a_count_or_a_fraction(cpr: float, clients: int, expected: int) -> None:
    cfg, _ = compose([f"clients={clients}", f"clients_per_round={cpr}"])
    assert cfg.sampled_per_round == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=fedsdv"], "unknown strategy 'fedsdv'; choose from ['fed_sb', 'fedavg', 'fedex', 'fedsa_lora', "),
        (["model=bert-huge"], "unknown model 'bert-huge'"),
        (["strategy=flora", "strategy.client_ranks=[2,x]"], "strategy.client_ranks must be ranks such as [2,4,8]"),
        (["strategy=flora", "strategy.client_ranks=[0,4]"], "strategy.client_ranks must be >= 1"),
        (["strategy=flora", "strategy.rank_rule=zipf"], "strategy.rank_rule must be one of ['cycle', 'random']"),
        (["strategy=lora_fair", "strategy.objective=l1"], "strategy.objective must be one of ['cosine', 'l2']"),
        (["strategy=lora_fair", "strategy.lam=-1"], "strategy.lam must be >= 0"),
        (["data=imagenet"], "unknown data 'imagenet'"),
        (["partition=zipf"], "unknown partition 'zipf'"),
        (["clients=0"], "clients must be >= 1"),
        (["clients=abc"], "clients: Value 'abc'"),
        (["clients=4", "clients_per_round=5"], "clients_per_round (5) must not exceed clients (4)"),
        (["clients_per_round=2.5"], "clients_per_round must be an integer count or a fraction"),
        (["lora.rank=0"], "lora.rank must be >= 1"),
        (["data=ag_news"], "data.path is required for data=ag_news"),
        (["train.head=maybe"], "train.head must be one of"),
        (["train.local_epochs=1"], "set exactly one of train.local_steps and train.local_epochs"),
        (["lora.bogus=1"], "unknown config key 'lora.bogus'"),
        (["rounds"], "expected key=value"),
        (["simulation.parallel_clients=0"], "simulation.parallel_clients must be >= 1"),
        (["simulation.parallel_clients=3", "simulation.num_cpus=0.5"], "a whole number of CPUs (got 1.5)"),
        (["simulation.parallel_clients=2", "simulation.ray_address=auto"], "a cluster's size is set where"),
    ],
)
def test_bad_input_is_one_clear_config_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=ffa_lora", "strategy.alpha=null"],
        ["strategy=fedsvd", "strategy.refactor_every=3", "strategy.weighting=uniform"],
        ["strategy=fed_sb", "strategy.init_lr=0.01", "strategy.init_svd=exact"],
        ["strategy=fed_sb"],
    ],
)
def test_flat_round_trip_of_every_strategy_config(overrides: list[str]) -> None:
    cfg, _ = compose(overrides)
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_strategies_set_the_run_s_lora_scaling() -> None:
    assert compose(["lora.alpha=32"])[0].scaling == 4.0  # fedavg: lora.alpha / rank
    assert compose(["strategy=ffa_lora", "lora.alpha=32"])[0].scaling == 8.0  # strategy.alpha = 64
    assert compose(["strategy=ffa_lora", "strategy.alpha=null", "lora.alpha=32"])[0].scaling == 4.0
    assert compose(["strategy=fed_sb", "lora.alpha=32"])[0].scaling == 1.0


def test_strategy_config_rejects_unknown_keys_and_bad_weighting() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        build_strategy_config({"name": "fedavg", "refactor_every": 2})
    with pytest.raises(ConfigError, match="weighting"):
        build_strategy_config({"name": "fedavg", "weighting": "by_size"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=ag_news", "data.path=/nonexistent/ag_news"], "data.path '/nonexistent/ag_news' does not exist"),
        (
            ["data.synthetic_train=5", "clients=6", "clients_per_round=1"],
            "clients (6) exceeds the training examples (5)",
        ),
        (["model=tiny", "lora.target_modules=[nothere]"], "lora.target_modules"),
        (["model.path=/nonexistent/model"], "model.path '/nonexistent/model' is not a folder"),
        (["strategy=fedsvd", "strategy.refactor_every=0"], "strategy.refactor_every must be >= 1"),
        (["strategy=fed_sb", "strategy.init_source=/nonexistent.csv"], "calibration file '/nonexistent.csv'"),
        (["strategy=ffa_lora", "strategy.bogus=1"], "unknown config key 'strategy.bogus'"),
    ],
)
def test_cli_exits_2_with_one_line(overrides: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--dry-run", "model=tiny", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err
    assert len(err.splitlines()) == 1


def test_missing_label_column_is_named(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train.csv").write_text("text,y\n" + "a b c,0\nd e f,1\n" * 10)
    (tmp_path / "test.csv").write_text("text,y\na b,0\n")
    code = main(["simulate", "--dry-run", "model=tiny", "data=files", f"data.path={tmp_path}", "clients=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.label_column 'label' is not a column" in err and "['text', 'y']" in err


def test_simulate_help_lists_the_chosen_strategy_s_keys_and_every_strategy_s_own(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["simulate", "strategy=fed_sb", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "strategy.init_source=clients" in out and "strategy.init_svd_iters=10" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 1}
    assert "init_source=clients" in lines["fed_sb"] and "client_ranks=" in lines["flora"]
    assert "alpha=64.0 refactor_every=1" in lines["fedsvd"] and "client_lr=" in lines["fedavg"]


def test_every_sweep_preset_starts_and_composes_in_every_cell(tmp_path, monkeypatch) -> None:
    """conf/sweep/*.yaml through `fedlora sweep`: the command accepts the preset (it composes every cell, the
    centralised one included, before running any), and each cell has its strategy and privacy level."""
    import importlib.resources

    import fedlora.commands.report
    import fedlora.commands.sweep
    from fedlora.commands.sweep import cell_overrides, defaults

    started: list[tuple[list, list]] = []
    monkeypatch.setattr(
        fedlora.commands.sweep, "run_cells", lambda cells, overrides, out, **_: started.append((cells, overrides))
    )
    monkeypatch.setattr(fedlora.commands.report, "write_report", lambda out: out / "report.html")
    presets = [p.name[:-5] for p in (importlib.resources.files("conf") / "sweep").iterdir() if p.name.endswith(".yaml")]
    assert "privacy_sst2" in presets
    for stem in presets:
        name, _, preset = stem.partition("_")
        preset_args = ["--preset", preset] if preset else []  # one seed: seeds change no setting, only draws
        assert main(["sweep", name, *preset_args, "--seeds", "0", "--out", str(tmp_path / stem)]) == 0
        cells, overrides = started.pop()
        assert any(cell.command == "centralised" for cell in cells) == defaults(name, preset or None)["centralised"]
        for cell in cells:
            cfg, _ = compose(cell_overrides(cell, overrides))
            if cell.command == "simulate":
                assert cfg.strategy.name == cell.strategy and cfg.privacy.any == cell.private
    # A part of a sweep: without the reference cell, or with it where the grid has none.
    assert main(["sweep", "privacy", "--preset", "sst2", "--no-centralised", "--out", str(tmp_path / "p")]) == 0
    assert not any(cell.command == "centralised" for cell in started.pop()[0])
    assert main(["sweep", "privacy", "--centralised", "--epsilons", "inf", "--out", str(tmp_path / "q")]) == 0
    assert [cell.command for cell in started.pop()[0]].count("centralised") == 1
    # An override no cell can take stops the sweep before its first cell.
    assert main(["sweep", "privacy", "--preset", "sst2", "--out", str(tmp_path / "bad"), "train.lr=-1"]) == 2
    assert not started


def test_a_preset_on_a_base_replaces_its_keys_in_place_and_every_results_file_matches_its_preset() -> None:
    """``base:`` gives a preset another's overrides first, its own replacing the same keys where they stand; every
    results file in docs/results/ still holds its preset's settings (else `fedlora bench` refuses to add to it)."""
    import json
    from pathlib import Path

    from fedlora.commands.results import protocol
    from fedlora.commands.sweep import defaults, merged

    assert merged(["a=1", "b=2"], ["b=3", "c=4"]) == ["a=1", "b=3", "c=4"]
    base, robust = defaults("privacy", "ag_news")["overrides"], defaults("privacy", "robust_cost")["overrides"]
    krum = "server.multi_krum=0.2"
    assert robust[: len(base)] == [krum if o.startswith("server.multi_krum=") else o for o in base]
    files = sorted((Path(__file__).parents[2] / "docs" / "results").glob("*.json"))
    assert len(files) >= 7
    for path in files:
        assert json.loads(path.read_text())["overrides"] == protocol(defaults("privacy", path.stem)["overrides"]), path


def test_piped_output_keeps_each_line_whole() -> None:
    """Through a pipe (| tee run.log) rich wrapped at 80 columns and cut table headers; now lines stay whole."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "simulate", "--dry-run", "model=tiny", "privacy=dp", "privacy.epsilon=8"],
        capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip
    line = next(line for line in done.stdout.splitlines() if "noise/signal per step" in line)
    assert "largest clipped mean" in line and len(line) > 120  # one line, not cut at 80 columns
    assert "epsilon" in done.stdout and "epsi…" not in done.stdout


def test_a_dry_run_says_nothing_was_trained_and_makes_no_folder(tmp_path, capsys) -> None:
    out = tmp_path / "never"
    assert main(["simulate", "--dry-run", "model=tiny", f"output_dir={out}"]) == 0
    text = capsys.readouterr().out
    assert "nothing was trained or written" in text and not out.exists()
    assert main(["simulate", "--dry-run", "model=tiny"]) == 0
    text = capsys.readouterr().out
    assert "output_dir: null" in text and "outputs/<date>/<time>" in text  # not a dated folder it never makes
