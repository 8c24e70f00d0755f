"""Sweep report from cell folders: the table's numbers, the files, resumability, bad folders."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.commands.report import PLOTS, write_report
from fedlora.commands.sweep import CELL, Cell, grid, run_cells
from fedlora.config.run import ConfigError
from fedlora.outputs.metrics import COLUMNS as METRIC_COLUMNS

COLUMNS = (*METRIC_COLUMNS, "refused", "epsilon_max", "epsilon_mean")


def fake_cell(root: Path, strategy: str, epsilon: float, seed: int, accuracy: list[float], eps: float | None) -> None:
    cell = Cell(strategy, epsilon, seed)
    folder = root / "cells" / cell.name
    folder.mkdir(parents=True)
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r, acc in enumerate(accuracy):
            row = {"round": r, "test_accuracy": acc, "bytes_up": 2000 if r else "", "refused": 0}
            if r and eps is not None:
                row["epsilon_max"] = eps * r / (len(accuracy) - 1)
            writer.writerow(row)
    (folder / CELL).write_text(
        json.dumps({"strategy": strategy, "epsilon": "inf" if math.isinf(epsilon) else epsilon, "seed": seed})
    )


def test_the_report_tables_mean_and_a_t_interval_over_seeds_and_writes_its_files(tmp_path: Path) -> None:
    fake_cell(tmp_path, "fedavg", 1.0, 0, [0.25, 0.5, 0.6], eps=0.98)
    fake_cell(tmp_path, "fedavg", 1.0, 1, [0.25, 0.5, 0.8], eps=0.97)
    fake_cell(tmp_path, "fedavg", math.inf, 0, [0.25, 0.7, 0.9], eps=None)
    page = write_report(tmp_path)
    assert page == tmp_path / "report.html"
    for name in ("report.md", "report.csv", "report.tex", *PLOTS):
        assert (tmp_path / name).stat().st_size > 0
    for name in PLOTS:  # vector copies for a paper
        assert (tmp_path / name).with_suffix(".pdf").read_bytes().startswith(b"%PDF")
        assert b"<svg" in (tmp_path / name).with_suffix(".svg").read_bytes()[:2000]
    tex = (tmp_path / "report.tex").read_text()
    assert "\\begin{tabular}" in tex and "fedavg & 1 & 2 & 0.700 $\\pm$ 1.271 & 0.700 & 0.980 & 0 & 2.00 KB" in tex
    assert "fedavg,1,2,0.700 ± 1.271,0.700,0.980,0,2.00 KB" in (tmp_path / "report.csv").read_text()
    md = (tmp_path / "report.md").read_text()
    # [0.6, 0.8]: mean 0.7, s = 0.1414, half-width t_{0.975,1} s / sqrt(2) = 12.706 x 0.1 = 1.271
    assert "| fedavg | 1 | 2 | 0.700 ± 1.271 | 0.700 | 0.980 | 0 | 2.00 KB |" in md
    assert "| fedavg | inf (no DP) | 1 | 0.900 | 0.900 | - | 0 | 2.00 KB |" in md  # one seed: no spread
    html = page.read_text()
    assert html.count('src="data:image/png;base64,') == len(PLOTS)  # one file that renders when mailed


def test_a_finished_sweep_runs_nothing_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cells = grid(["fedavg"], [4.0, math.inf], [0])
    for cell in cells:
        fake_cell(tmp_path, cell.strategy, cell.epsilon, cell.seed, [0.25, 0.5], eps=3.9)

    def no_runs(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr("subprocess.run", no_runs)
    run_cells(cells, ["model=tiny"], tmp_path)
    assert write_report(tmp_path).is_file()


def test_cells_name_their_privacy() -> None:
    assert Cell("fed_sb", math.inf, 2).overrides() == ["strategy=fed_sb", "seed=2", "privacy=none"]
    assert Cell("fedavg", 4.0, 0).overrides()[-2:] == ["privacy=dp", "privacy.epsilon=4"]
    assert Cell("fedavg", 0.5, 1).name == "fedavg/eps-0.5/seed-1"


def test_a_strategy_takes_its_own_settings_after_the_shared_ones(tmp_path: Path, monkeypatch) -> None:
    """strategy_overrides: only that strategy's cells carry them, after the shared overrides (so they win over the
    preset's), while a key set on the command line stays the command line's; the report names them."""
    import fedlora.commands.sweep
    from fedlora.commands.sweep import cell_overrides
    from fedlora.config.compose import compose

    cells = grid(["fedavg", "fed_sb"], [4.0], [0], strategy_overrides={"fed_sb": ["lora.rank=6"]})
    assert cells[0].settings == () and cells[1].settings == ("lora.rank=6",)
    ranks = {c.strategy: compose(cell_overrides(c, ["lora.rank=2"]))[0].lora.rank for c in cells}
    assert ranks == {"fedavg": 2, "fed_sb": 6}
    with pytest.raises(ConfigError, match="unknown strategy 'fedsdv'"):
        grid(["fedavg"], [4.0], [0], strategy_overrides={"fedsdv": ["lora.rank=6"]})

    started: list[list] = []
    monkeypatch.setattr(fedlora.commands.sweep, "run_cells", lambda cells, overrides, out, **_: started.append(cells))
    monkeypatch.setattr("fedlora.commands.report.write_report", lambda out: out / "report.html")
    assert main(["sweep", "privacy", "--preset", "sst2", "--out", str(tmp_path / "a")]) == 0
    assert {c.settings for c in started.pop() if c.strategy == "fed_sb"} == {("lora.rank=32",)}
    assert main(["sweep", "privacy", "--preset", "sst2", "--out", str(tmp_path / "b"), "lora.rank=4"]) == 0
    assert all(c.settings == () for c in started.pop())  # the command line's rank for every strategy

    fake_cell(tmp_path, "fed_sb", 4.0, 0, [0.25, 0.6], eps=3.9)
    (tmp_path / "sweep.json").write_text(json.dumps({"cells": [asdict(c) for c in cells]}))  # as run_cells writes
    write_report(tmp_path)
    assert "- **per strategy**: `fed_sb: lora.rank=6`" in (tmp_path / "report.md").read_text()


def test_the_centralised_reference_takes_its_own_settings(tmp_path: Path, monkeypatch) -> None:
    """strategy_overrides' ``centralised`` entry reaches the reference cells and no others: AG News' pooled
    reference runs 2,000 steps in one go and needs a decaying lr where the rounds restart a constant one."""
    import fedlora.commands.sweep
    from fedlora.commands.sweep import CENTRALISED, cell_overrides
    from fedlora.config.compose import compose

    own = {CENTRALISED: ["train.lr_schedule=cosine"]}
    cells = grid(["fedavg"], [math.inf], [0, 1], centralised=True, strategy_overrides=own)
    schedules = {c.name: compose(cell_overrides(c, ["rounds=2"]))[0].train.lr_schedule for c in cells}
    assert schedules == {"centralised/eps-inf/seed-0": "cosine", "centralised/eps-inf/seed-1": "cosine",
                         "fedavg/eps-inf/seed-0": "constant", "fedavg/eps-inf/seed-1": "constant"}  # fmt: skip
    assert cells[1].overrides() == ["train.lr_schedule=cosine", "seed=1"]  # what `fedlora centralised` is given

    started: list[list] = []
    monkeypatch.setattr(fedlora.commands.sweep, "run_cells", lambda cells, overrides, out, **_: started.append(cells))
    monkeypatch.setattr("fedlora.commands.report.write_report", lambda out: out / "report.html")
    argv = ["sweep", "privacy", "--preset", "ag_news", "--strategies", "fedavg", "--seeds", "0", "--out"]
    assert main([*argv, str(tmp_path / "a")]) == 0
    assert [(c.strategy, c.settings) for c in started.pop()] == [
        (CENTRALISED, ("train.lr_schedule=cosine",)),
        ("fedavg", ()),
    ]
    assert main([*argv, str(tmp_path / "b"), "train.lr_schedule=constant"]) == 0
    assert all(c.settings == () for c in started.pop())  # the command line's schedule for every cell


def test_report_and_sweep_refuse_bad_input_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert main(["sweep", "privacy", "--strategies", "fedsdv", "--out", str(tmp_path)]) == 2
    assert main(["sweep", "privacy", "--epsilons", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a sweep folder" in err and "unknown strategy 'fedsdv'" in err and "epsilons must be > 0" in err


def test_the_centralised_reference_heads_the_table_and_the_grid(tmp_path: Path) -> None:
    from fedlora.commands.sweep import CENTRALISED

    fake_cell(tmp_path, CENTRALISED, math.inf, 0, [0.25, 0.95], eps=None)
    fake_cell(tmp_path, "fedavg", 4.0, 0, [0.25, 0.6], eps=3.9)
    write_report(tmp_path)
    table_rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert table_rows[1].startswith("| centralised (reference) | inf (no DP) | 1 | 0.950 |")
    cells = grid(["fedavg"], [4.0], [0, 1], centralised=True)
    assert [c.name for c in cells[:2]] == ["centralised/eps-inf/seed-0", "centralised/eps-inf/seed-1"]
    assert cells[0].command == "centralised" and cells[0].overrides() == ["seed=0"]


def test_the_report_compares_each_strategy_with_fedavg_on_paired_seeds(tmp_path: Path) -> None:
    for seed, (avg, sb) in enumerate([(0.80, 0.83), (0.82, 0.84), (0.81, 0.85)]):
        fake_cell(tmp_path, "fedavg", 1.0, seed, [0.25, avg], eps=0.99)
        fake_cell(tmp_path, "fed_sb", 1.0, seed, [0.25, sb], eps=0.99)
    fake_cell(tmp_path, "ffa_lora", 1.0, 0, [0.25, 0.9], eps=0.99)
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    # differences 3, 2, 4 points: mean 3.0, s = 1, half-width 4.303 / sqrt(3) = 2.48 -> [+0.5, +5.5]
    assert "fed_sb - fedavg at epsilon 1: +3.0 points, 95% CI [+0.5, +5.5], 3 paired seeds: fed_sb is ahead" in md
    assert "ffa_lora - fedavg at epsilon 1: +10.0 points, 1 seed: no interval, no ordering can be stated" in md


def test_the_table_shows_personalised_accuracy_and_traffic_each_way_when_measured() -> None:
    from fedlora.commands.report import CellResult, table

    def cell(strategy: str, seed: int, personal) -> CellResult:
        return CellResult(strategy, math.inf, seed, [0, 1], [0.2, 0.6], [100.0], None, 0, download=[300.0],
                          personal=personal)  # fmt: skip

    header, body = table(
        [cell("fedsa_lora", 0, (0.8, 0.5)), cell("fedsa_lora", 1, (0.9, 0.7)), cell("fedavg", 0, None)]
    )
    assert header[4:6] == ["personalised (mean ± CI)", "worst 10% of clients"] and header[-1] == "download per round"
    rows = {r[0]: r for r in body}
    assert rows["fedsa_lora"][4].startswith("0.850 ± ") and rows["fedsa_lora"][5] == "0.600"
    assert rows["fedavg"][4:6] == ["-", "-"] and rows["fedavg"][-1] == "300 B"
    plain, _ = table([cell("fedavg", 0, None)])
    assert "worst 10% of clients" not in plain


def test_personalised_accuracy_is_compared_with_fedavg_s_on_paired_seeds_where_both_measured_it() -> None:
    from fedlora.commands.report import CellResult, comparisons

    def cell(strategy: str, seed: int, final: float, personal: float | None) -> CellResult:
        return CellResult(strategy, math.inf, seed, [0, 1], [0.2, final], [100.0], None, 0,
                          personal=None if personal is None else (personal, 0.5))  # fmt: skip

    lines = comparisons(
        [cell("fedavg", s, 0.85, p) for s, p in enumerate([0.90, 0.91, None])]
        + [cell("fedsa_lora", s, 0.80, p) for s, p in enumerate([0.93, 0.95, 0.99])]
        + [cell("flora", 0, 0.86, None)]
    )
    # final: -5 points on all three seeds; personalised: +3 and +4 on the two seeds FedAvg measured (seed 2 not)
    assert lines[0].startswith("fedsa_lora - fedavg without DP: -5.0 points, 95% CI [-5.0, -5.0], 3 paired seeds")
    assert lines[1].startswith("fedsa_lora - fedavg without DP, personalised: +3.5 points, 95% CI [-2.9, +9.9], 2 ")
    assert lines[2:] == ["flora - fedavg without DP: +1.0 points, 1 seed: no interval, no ordering can be stated"]


def test_the_mean_of_the_last_rounds_is_compared_beside_the_final_round_when_runs_are_long_enough() -> None:
    """A run whose last round lands on a bad cohort: the final round says FedAvg is ahead by 15 points, the
    mean of the last 5 rounds (what averages over cohorts) says the other strategy is, by 3; runs of fewer
    than 10 rounds give no tail mean (round 0, before training, is not one of the rounds)."""
    from fedlora.commands.report import CellResult, comparisons

    def cell(strategy: str, seed: int, accuracy: list[float]) -> CellResult:
        return CellResult(strategy, 6.0, seed, list(range(len(accuracy))), accuracy, [1.0], 5.9, 0)

    steady = [0.5] + [0.80] * 10
    lucky = [0.5] + [0.80] * 9 + [0.90]  # tail mean 0.82, final 0.90
    unlucky = [0.5] + [0.875] * 9 + [0.75]  # tail mean 0.85, final 0.75
    lines = comparisons([cell("fedavg", s, lucky) for s in range(3)] + [cell("fedsvd", s, unlucky) for s in range(3)])
    assert lines[0].startswith("fedsvd - fedavg at epsilon 6: -15.0 points, 95% CI [-15.0, -15.0], 3 paired seeds")
    assert lines[1].startswith("fedsvd - fedavg at epsilon 6, mean of the last 5 rounds: +3.0 points, 95% CI [+3.0,")
    assert len(lines) == 2
    short = comparisons([cell("fedavg", 0, steady[:10]), cell("fedsvd", 0, steady[:10])])
    assert short == ["fedsvd - fedavg at epsilon 6: +0.0 points, 1 seed: no interval, no ordering can be stated"]
    assert cell("x", 0, steady).tail == 0.80 and cell("x", 0, steady[:10]).tail is None


def test_fedavg_is_compared_with_the_centralised_reference_first_where_a_file_has_one() -> None:
    """How close federated gets to the pooled run, on paired seeds (same init and test set): FedAvg against the
    reference, final round and tail, before every strategy against FedAvg; nothing else against the reference."""
    from fedlora.commands.report import CellResult, comparisons

    def cell(strategy: str, seed: int, level: float) -> CellResult:
        return CellResult(strategy, math.inf, seed, list(range(11)), [0.25] + [level + seed / 100] * 10, [1.0], None, 0)

    reference = [cell("centralised", s, 0.88) for s in range(3)]
    lines = comparisons(reference + [cell("fedavg", s, 0.86) for s in range(3)] + [cell("ffa_lora", 0, 0.85)])
    assert lines[0] == ("fedavg - centralised without DP: -2.0 points, 95% CI [-2.0, -2.0], 3 paired seeds: "
                        "centralised is ahead")  # fmt: skip
    assert lines[1].startswith("fedavg - centralised without DP, mean of the last 5 rounds: -2.0 points")
    assert len(lines) == 4 and all(line.startswith("ffa_lora - fedavg without DP") for line in lines[2:])
    assert comparisons([*reference, cell("ffa_lora", 0, 0.85)]) == []  # no FedAvg: nothing to pair


def test_a_report_whose_every_cell_is_at_chance_says_so_first(tmp_path: Path) -> None:
    """Four classes (chance 0.25): cells ending at 0.235-0.29 learned nothing, and the report leads with
    that; one cell at 0.40 is enough for no warning."""
    from fedlora.outputs.run_folder import ADAPTER_DIR, EXPORT_LABELS

    def cells(root: Path, finals: list[float]) -> Path:
        for seed, final in enumerate(finals):
            fake_cell(root, "fedavg", math.inf, seed, [0.25, final], eps=None)
            adapter = root / "cells" / Cell("fedavg", math.inf, seed).name / ADAPTER_DIR
            adapter.mkdir()
            (adapter / EXPORT_LABELS).write_text(json.dumps(["a", "b", "c", "d"]))
        return root

    write_report(cells(tmp_path / "chance", [0.235, 0.29, 0.26]))
    md = (tmp_path / "chance" / "report.md").read_text()
    assert md.splitlines()[2].startswith("**Every cell ends within 5 points of chance (1/4 = 0.250)")
    assert "Every cell ends within" in (tmp_path / "chance" / "report.html").read_text()
    write_report(cells(tmp_path / "learned", [0.235, 0.40]))
    assert "chance" not in (tmp_path / "learned" / "report.md").read_text().split("|")[0]
