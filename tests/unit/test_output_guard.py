"""What a run may do to its output folder: never delete an input, never share the folder with another run,
and say in one line (exit 2) when the folder cannot be written, before any work. Each case leaves the
files it found byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
from filelock import FileLock

from fedlora.cli import main
from fedlora.outputs.run_folder import LOCK

TINY = ["model=tiny", "data.synthetic_train=200", "data.synthetic_test=64", "rounds=1", "train.local_steps=1"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, *args: str) -> str:
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def csv_data(path: Path) -> None:
    rows = [f"text {i} {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")


def test_overwrite_never_deletes_the_run_s_input(tmp_path: Path, capsys) -> None:
    """The data file is named metrics.csv, as a run output would be: --overwrite refuses instead of deleting it."""
    data = tmp_path / "metrics.csv"
    csv_data(data)
    before = snapshot(tmp_path)
    err = one_line_error(capsys, *TINY, "data=files", f"data.path={data}", f"output_dir={tmp_path}", "--overwrite")
    assert "--overwrite would delete this run's input" in err and "metrics.csv" in err
    assert snapshot(tmp_path) == before


def test_overwrite_never_deletes_the_data_folder_or_a_calibration_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "adapter").mkdir()  # a folder named as a run's output, holding the data
    csv_data(tmp_path / "adapter" / "train.csv")
    before = snapshot(tmp_path)
    err = one_line_error(
        capsys, *TINY, "data=files", f"data.path={tmp_path / 'adapter' / 'train.csv'}", f"output_dir={tmp_path}",
        "--overwrite",
    )  # fmt: skip
    assert "adapter in" in err and snapshot(tmp_path) == before


def test_a_folder_in_use_by_another_run_is_refused_and_left_alone(tmp_path: Path, capsys) -> None:
    (tmp_path / "metrics.csv").write_text("round,test_accuracy\n0,0.25\n")  # the first run's outputs
    (tmp_path / "server.log").write_text("first run\n")
    first = FileLock(str(tmp_path / LOCK), timeout=0)
    first.acquire()  # as the first run holds it while it writes
    before = snapshot(tmp_path)
    try:
        err = one_line_error(capsys, *TINY, f"output_dir={tmp_path}", "--overwrite")
    finally:
        first.release()
    assert "in use by another fedlora run" in err
    assert snapshot(tmp_path) == before


def test_resume_with_overwrite_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "checkpoint.safetensors").write_bytes(b"not read")
    err = one_line_error(capsys, *TINY, f"output_dir={tmp_path}", "--overwrite", "server.resume=true")
    assert "would delete the checkpoint it resumes from" in err
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == b"not read"


@pytest.mark.parametrize("where", ["under_a_file", "unwritable"])
def test_an_output_dir_that_cannot_be_written_is_one_line_before_the_data_loads(tmp_path: Path, capsys, where) -> None:
    if where == "under_a_file":
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "run"
    else:
        out = Path("/proc/self/fedlora-run")  # a read-only file system, even for root
    # The data path does not exist either: the output folder's error comes first, before any data is read.
    err = one_line_error(capsys, *TINY, "data=files", "data.path=/nonexistent.csv", f"output_dir={out}")
    assert "output_dir" in err and ("is a file" in err or "cannot be written" in err), err
