"""experiments/compare_strategies.py over seeds: the table and the paired lines come from its runs' metrics
(the runs here are written by hand; a real one is ``fedlora simulate``)."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from fedlora.outputs.metrics import COLUMNS

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "compare_strategies.py"


def load_script():
    spec = importlib.util.spec_from_file_location("compare_strategies", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeded_comparisons_give_the_final_round_and_the_mean_of_the_last_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Over 3 seeds FedAvg's last cohort is lucky (final 0.90, last 5 rounds 0.82) and FedSVD's unlucky
    (0.75, 0.85): the final round puts FedAvg 15 points ahead, the mean of the last 5 FedSVD 3 points ahead,
    and the script prints both; the table rows are mean ± t half-width with n = 3."""
    script = load_script()
    curves = {"fedavg": [0.80] * 9 + [0.90], "fedsvd": [0.875] * 9 + [0.75]}

    def fake_run(command: str, overrides: list[str], out: Path) -> float:
        strategy = next(o.split("=", 1)[1] for o in overrides if o.startswith("strategy="))
        out.mkdir(parents=True)
        with (out / "metrics.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
            writer.writeheader()
            writer.writerow({"round": 0, "test_accuracy": 0.25})
            for rnd, acc in enumerate(curves[strategy], start=1):
                writer.writerow({"round": rnd, "test_accuracy": acc, "bytes_up": 1000, "bytes_down": 1000})
        return 60.0

    monkeypatch.setattr(script, "run", fake_run)
    argv = ["--seeds", "0", "1", "2", "--strategies", "fedavg", "fedsvd", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["compare_strategies.py", *argv])
    assert script.main() == 0
    table = (tmp_path / "table.md").read_text()
    assert "| fedsvd | 0.750 ± 0.000 | 0.875 ± 0.000 | 0.750 ± 0.000 |" in table and "| 3 | 3.0 |" in table
    lines = [line for line in table.splitlines() if line.startswith("- ")]
    assert lines[0].startswith("- fedsvd - fedavg: -15.0 points, 95% CI [-15.0, -15.0], 3 paired seeds")
    assert lines[1].startswith("- fedsvd - fedavg (mean of the last 5 rounds): +3.0 points, 95% CI [+3.0, +3.0]")
    assert lines[1].endswith("fedsvd is ahead") and len(lines) == 2
    assert capsys.readouterr().out.count("mean of the last 5 rounds") == 1


def test_short_runs_are_compared_on_the_final_round_only(tmp_path: Path) -> None:
    """Under 10 rounds the last 5 are mostly the climb: no tail line."""
    script = load_script()
    short = {"final": 0.8, "tail": None}
    lines = script.against({"fedavg": {0: short, 1: short}, "fedsvd": {0: short, 1: short}}, "fedavg")
    assert lines == ["- fedsvd - fedavg: +0.0 points, 95% CI [+0.0, +0.0], 2 paired seeds: no difference measurable "
                     "with 2 seeds"]  # fmt: skip
