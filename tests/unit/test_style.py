"""The linter's rules (pyproject [tool.ruff]) hold on the whole tree."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed with the test extra")
def test_ruff_finds_nothing() -> None:
    done = subprocess.run(["ruff", "check", str(ROOT)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
