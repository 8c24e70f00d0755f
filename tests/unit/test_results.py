"""Benchmarks as results files: cells recorded as they finish, never run twice, and the docs' tables generated
from the file (a number edited by hand fails the check). Cells are faked: no simulation runs here."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.commands.results import load_results, render, update_pages
from fedlora.outputs.metrics import COLUMNS

ACCURACY = {("fedavg", 0): 0.80, ("fedavg", 1): 0.82, ("fedavg", 2): 0.81, ("fed_sb", 0): 0.83,
            ("fed_sb", 1): 0.84, ("fed_sb", 2): 0.85}  # fmt: skip


def fake_simulate(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """What a cell's ``fedlora simulate`` leaves: metrics.csv (2 rounds) and run_config.json."""
    args = dict(a.split("=", 1) for a in cmd if "=" in a)
    out = Path(args["output_dir"])
    final = ACCURACY[(args["strategy"], int(args["seed"]))]
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r, acc in enumerate([0.25, final - 0.1, final]):
            writer.writerow({"round": r, "test_accuracy": acc, "bytes_up": 1000 * r, "wall_s": 1.5})
    (out / "run_config.json").write_text(json.dumps({"seed": int(args["seed"]), "strategy.name": args["strategy"]}))
    return subprocess.CompletedProcess(cmd, 0)


def sweep(tmp_path: Path, seeds: list[int], *overrides: str) -> int:
    return main(["sweep", "privacy", "model=tiny", "rounds=2", *overrides, "--out", str(tmp_path / "sweep"),
                 "--results", str(tmp_path / "ab.json"), "--strategies", "fedavg", "fed_sb", "--epsilons", "inf",
                 "--no-centralised", "--seeds", *map(str, seeds)])  # fmt: skip


def test_cells_are_recorded_as_they_finish_and_never_run_again(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("fedlora.commands.sweep.subprocess.run", fake_simulate)
    assert sweep(tmp_path, [0, 1]) == 0
    data = json.loads((tmp_path / "ab.json").read_text())
    assert sorted(data["cells"]) == [f"{s}/eps-inf/seed-{k}" for s in ("fed_sb", "fedavg") for k in (0, 1)]
    cell = data["cells"]["fedavg/eps-inf/seed-1"]
    assert [r["test_accuracy"] for r in cell["rounds"]] == [0.25, pytest.approx(0.72), 0.82]
    assert [r["wall_s"] for r in cell["rounds"]] == [1.5] * 3
    assert cell["config"]["seed"] == 1 and cell["wall_s"] >= 0 and data["versions"]["torch"]
    assert "model=tiny" in data["overrides"] and data["commands"] == [cell["command"]]
    assert cell["command"].startswith("fedlora")

    def no_runs(*args, **kwargs):
        raise AssertionError("a recorded cell ran again")

    monkeypatch.setattr("fedlora.commands.sweep.subprocess.run", no_runs)
    import shutil

    shutil.rmtree(tmp_path / "sweep")  # the runs' folder gone (another machine): the results file still says done
    assert sweep(tmp_path, [0, 1]) == 0
    monkeypatch.setattr("fedlora.commands.sweep.subprocess.run", fake_simulate)
    assert sweep(tmp_path, [0, 1, 2]) == 0  # one more seed: only its two cells run
    assert len(json.loads((tmp_path / "ab.json").read_text())["cells"]) == 6


def test_a_results_file_refuses_cells_of_other_settings(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("fedlora.commands.sweep.subprocess.run", fake_simulate)
    assert sweep(tmp_path, [0]) == 0
    assert sweep(tmp_path, [0], "train.lr=0.1") == 2  # one line, exit 2: the file holds other settings
    assert sweep(tmp_path, [0, 1], "simulation.num_cpus=0.5") == 0  # where cells run is not what they compute
    data = json.loads((tmp_path / "ab.json").read_text())
    assert len(data["cells"]) == 4 and not any("simulation" in o for o in data["overrides"])


def test_a_new_seed_is_refused_when_a_default_changed_since_the_recorded_cells(tmp_path: Path, monkeypatch) -> None:
    """The overrides are the same, but fedlora's defaults moved (as server.multi_krum's did): a new seed would
    run other settings than the recorded ones of its strategy, and averaging them would mix two setups."""
    monkeypatch.setattr("fedlora.commands.sweep.subprocess.run", fake_simulate)
    assert sweep(tmp_path, [0]) == 0
    book = tmp_path / "ab.json"
    data = json.loads(book.read_text())
    data["cells"]["fedavg/eps-inf/seed-0"]["config"]["server.multi_krum"] = 0.0  # as recorded before the change
    book.write_text(json.dumps(data))
    assert sweep(tmp_path, [0, 1]) == 2  # one line, exit 2; nothing ran
    assert sorted(json.loads(book.read_text())["cells"]) == ["fed_sb/eps-inf/seed-0", "fedavg/eps-inf/seed-0"]
    assert sweep(tmp_path, [0, 1], "server.multi_krum=0") == 2  # another override list: refused as before
    data["cells"]["fedavg/eps-inf/seed-0"]["config"]["server.multi_krum"] = 0.2  # the default the new seed runs
    book.write_text(json.dumps(data))
    assert sweep(tmp_path, [0, 1]) == 0


def test_the_docs_table_is_generated_and_a_hand_edited_number_fails_the_check(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("fedlora.commands.sweep.subprocess.run", fake_simulate)
    assert sweep(tmp_path, [0, 1, 2]) == 0
    assert {c.seed for c in load_results(tmp_path / "ab.json")} == {0, 1, 2}
    page = tmp_path / "page.md"
    page.write_text("# Results\n\n<!-- table: ab.json -->\nanything\n<!-- /table -->\n\nText after.\n")
    assert update_pages([page], check=True) == [page]  # stale until generated
    assert update_pages([page], check=False) == [page]
    text = page.read_text()
    assert render(tmp_path / "ab.json") in text and text.endswith("Text after.\n")
    # fedavg 0.80, 0.82, 0.81: mean 0.810, s = 0.01, half-width 4.303 x 0.01 / sqrt(3) = 0.025
    assert "| fedavg | inf (no DP) | 3 | 0.810 ± 0.025 |" in text
    assert "fed_sb - fedavg without DP: +3.0 points, 95% CI [+0.5, +5.5], 3 paired seeds: fed_sb is ahead" in text
    assert update_pages([page], check=True) == []
    page.write_text(text.replace("0.810 ± 0.025", "0.815 ± 0.025"))  # a number typed by hand
    assert update_pages([page], check=True) == [page]
    assert main(["tables", "--check", str(page)]) == 1


def test_the_repository_s_docs_equal_their_results_files() -> None:
    root = Path(__file__).resolve().parents[2]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    assert update_pages(pages, check=True) == []


def test_every_command_that_ran_cells_is_kept_and_shown(tmp_path: Path, monkeypatch) -> None:
    """A benchmark run in parts: each part's command stays in the file (each cell names its own), and the
    generated block lists them all, oldest first; a file from before, with one ``command``, keeps it first."""
    monkeypatch.setattr("fedlora.commands.sweep.subprocess.run", fake_simulate)
    book = tmp_path / "ab.json"
    for seeds in ([0], [1]):
        monkeypatch.setattr("sys.argv", ["fedlora", "bench", "ab", "--seeds", str(seeds[0])])
        assert sweep(tmp_path, seeds) == 0
    data = json.loads(book.read_text())
    assert data["commands"] == ["fedlora bench ab --seeds 0", "fedlora bench ab --seeds 1"]
    assert data["cells"]["fedavg/eps-inf/seed-1"]["command"] == "fedlora bench ab --seeds 1"
    assert "`fedlora bench ab --seeds 0`; `fedlora bench ab --seeds 1`." in render(book)
    data["command"] = data.pop("commands")[0]  # as a file written before commands were kept
    book.write_text(json.dumps(data))
    monkeypatch.setattr("sys.argv", ["fedlora", "bench", "ab", "--seeds", "2"])
    assert sweep(tmp_path, [2]) == 0
    data = json.loads(book.read_text())
    assert "command" not in data and data["commands"] == ["fedlora bench ab --seeds 0", "fedlora bench ab --seeds 2"]


def test_tables_draws_each_results_file_s_figures(tmp_path: Path, monkeypatch) -> None:
    """`fedlora tables --figures DIR`: a results file's report figures, from the file alone (no runs folder)."""
    monkeypatch.setattr("fedlora.commands.sweep.subprocess.run", fake_simulate)
    assert sweep(tmp_path, [0, 1]) == 0
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "ab.json").rename(tmp_path / "docs" / "results" / "ab.json")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    assert main(["tables", "--figures", "a_file", str(tmp_path / "none.md")]) == 2  # one line, not a traceback
    assert main(["tables", "--figures", "figs", str(tmp_path / "none.md")]) == 0
    assert {p.name for p in (tmp_path / "figs" / "ab").glob("*.png")} == {
        "accuracy_vs_epsilon.png",
        "accuracy_vs_round.png",
        "accuracy_vs_upload.png",
    }


def test_a_cell_run_with_the_same_settings_for_another_benchmark_is_copied_not_run(tmp_path: Path, monkeypatch) -> None:
    """Two results files side by side: a cell of the second whose every setting the first recorded is copied
    (naming its source and keeping its command); one setting apart, it runs."""
    from fedlora.config.compose import compose

    def full_simulate(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        done = fake_simulate(cmd, **kwargs)
        overrides = [a for a in cmd if "=" in a and not a.startswith("-")]
        out = Path(dict(a.split("=", 1) for a in overrides)["output_dir"])
        (out / "run_config.json").write_text(json.dumps(compose(overrides)[0].to_flat()))  # as simulate writes it
        return done

    def run(results: str, *overrides: str) -> int:
        return main(["sweep", "privacy", "model=tiny", "rounds=2", *overrides, "--out", str(tmp_path / results),
                     "--results", str(tmp_path / f"{results}.json"), "--strategies", "fedavg", "--epsilons", "inf",
                     "--no-centralised", "--seeds", "0"])  # fmt: skip

    monkeypatch.setattr("fedlora.commands.sweep.subprocess.run", full_simulate)
    assert run("first") == 0
    first = json.loads((tmp_path / "first.json").read_text())["cells"]["fedavg/eps-inf/seed-0"]

    def no_runs(*args, **kwargs):
        raise AssertionError("a cell another benchmark ran with these settings ran again")

    monkeypatch.setattr("fedlora.commands.sweep.subprocess.run", no_runs)
    assert run("second") == 0
    second = json.loads((tmp_path / "second.json").read_text())
    copied = second["cells"]["fedavg/eps-inf/seed-0"]
    assert copied["copied_from"] == "first.json" and copied["rounds"] == first["rounds"]
    assert second["commands"] == [first["command"]]
    assert "1 of them copied from first.json" in render(tmp_path / "second.json")
    assert run("fourth", "simulation.num_cpus=0.5") == 0  # on 4 Ray workers where first ran on 2: the same run
    assert json.loads((tmp_path / "fourth.json").read_text())["cells"]["fedavg/eps-inf/seed-0"]["copied_from"]
    ran = []
    monkeypatch.setattr("fedlora.commands.sweep.subprocess.run", lambda cmd, **kw: ran.append(1) or full_simulate(cmd))
    assert run("third", "train.lr=0.01") == 0  # another learning rate: not the same run
    assert (
        ran and "copied_from" not in json.loads((tmp_path / "third.json").read_text())["cells"]["fedavg/eps-inf/seed-0"]
    )


@pytest.mark.parametrize("content", ['{"cells": {', "[]", None], ids=["truncated", "not-a-results-file", "missing"])
def test_a_docs_block_naming_a_bad_results_file_gets_one_line_and_status_2(tmp_path: Path, monkeypatch, capsys,
                                                                         content: str | None) -> None:  # fmt: skip
    (tmp_path / "docs" / "results").mkdir(parents=True)
    page = tmp_path / "docs" / "page.md"
    page.write_text("before\n<!-- table: results/x.json -->\n<!-- /table -->\n")
    if content is not None:
        (tmp_path / "docs" / "results" / "x.json").write_text(content)
    monkeypatch.chdir(tmp_path)
    assert main(["tables", str(page)]) == 2
    said = capsys.readouterr()
    err = (said.out + said.err).strip()
    assert len(err.splitlines()) == 1 and "x.json" in err and "Traceback" not in err
    assert page.read_text() == "before\n<!-- table: results/x.json -->\n<!-- /table -->\n"  # the page is untouched


def test_the_readme_s_brief_is_generated_one_row_per_results_file(tmp_path: Path, monkeypatch) -> None:
    """A ``brief`` block (the README's summary): per results file its settings, each strategy's final accuracy
    with its interval and n, and only the orderings whose paired interval excludes zero; a file of one seed
    says none can be stated; a number edited by hand fails the check."""
    monkeypatch.setattr("fedlora.commands.sweep.subprocess.run", fake_simulate)
    assert sweep(tmp_path, [0, 1, 2]) == 0
    one = tmp_path / "one"
    one.mkdir()
    assert sweep(one, [0], "clients=6") == 0
    page = tmp_path / "README.md"
    page.write_text("<!-- brief: ab.json one/ab.json -->\n<!-- /brief -->\n")
    assert update_pages([page], check=False) == [page]
    rows = page.read_text().splitlines()[3:5]
    assert rows[0].startswith("| ab.json: tiny, default data, 2 rounds |") and rows[0].endswith(
        "| no DP: fedavg 0.810 ± 0.025 (n=3), fed_sb 0.840 ± 0.025 (n=3) "
        "| fed_sb - fedavg without DP: +3.0 [+0.5, +5.5] |"
    )
    assert "6 clients" in rows[1]
    assert rows[1].endswith("| no DP: fedavg 0.800 (n=1), fed_sb 0.830 (n=1) | one seed: none can be stated |")
    assert update_pages([page], check=True) == []
    page.write_text(page.read_text().replace("0.840 ± 0.025", "0.845 ± 0.025"))
    assert update_pages([page], check=True) == [page]
    (tmp_path / "empty.json").write_text(json.dumps({"name": "empty", "cells": {}}))  # a benchmark not yet run
    page.write_text("<!-- brief: empty.json -->\n<!-- /brief -->\n")
    assert update_pages([page], check=False) == [page]
    empty = "| empty.json: default model, default data, default rounds | - | no cells yet |"
    assert page.read_text().splitlines()[3] == empty
