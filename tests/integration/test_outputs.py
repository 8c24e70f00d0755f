"""Outputs are never lost, and a checkpoint is checked before anything starts.

Every refusal here happens before Ray starts (exit 2, one line, the folder untouched);
the checkpoints come from a real ServerApp run on :class:`tests.local_grid.LocalGrid`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedlora.cli import main
from fedlora.commands.simulate import check_aggregated
from fedlora.config.run import RunFailed
from tests.conftest import TINY
from tests.local_grid import run_in_process

RUN = [*TINY, "clients=2", "clients_per_round=2", "rounds=2"]


def local_run(make_config, out: Path, *extra: str) -> Path:
    return run_in_process(make_config("clients=2", "clients_per_round=2", "rounds=2", f"output_dir={out}", *extra))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_a_folder_holding_a_run_is_refused_and_left_as_it_was(make_config, tmp_path, capsys) -> None:
    out = local_run(make_config, tmp_path / "run")
    before = snapshot(out)
    assert main(["simulate", *RUN, f"output_dir={out}"]) == 2
    assert "already holds a run" in one_error_line(capsys) and snapshot(out) == before
    # A rejected run (bad config) writes nothing either, in a fresh folder or this one.
    assert main(["simulate", *RUN, "strategy.weighting=by_size", f"output_dir={tmp_path / 'new'}"]) == 2
    assert not (tmp_path / "new").exists()
    # A folder with other files but no run is fine to use: --dry-run validates without writing.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    assert main(["simulate", "--dry-run", *RUN, f"output_dir={tmp_path / 'notes'}"]) == 0
    assert snapshot(tmp_path / "notes") == {"mine.txt": b"keep"}


def test_overwrite_replaces_only_the_runs_outputs(make_config, tmp_path) -> None:
    from fedlora.outputs.run_folder import clear_outputs, held_outputs

    out = local_run(make_config, tmp_path)
    (out / "mine.txt").write_text("keep")
    assert {"metrics.csv", "checkpoint.safetensors", "adapter", "server.log"} <= set(held_outputs(out))
    clear_outputs(out)
    assert held_outputs(out) == [] and (out / "mine.txt").read_text() == "keep"


def test_server_log_starts_fresh_per_run_and_is_appended_on_resume(make_config, tmp_path) -> None:
    out = local_run(make_config, tmp_path)
    (out / "server.log").write_text("an unrelated earlier run\n")
    local_run(make_config, tmp_path)
    assert "an unrelated earlier run" not in (out / "server.log").read_text()
    (out / "server.log").write_text("this run's first part\n")
    local_run(make_config, tmp_path, "rounds=3", "server.resume=true")
    text = (out / "server.log").read_text()
    assert text.startswith("this run's first part") and "resuming after round 2 of 3" in text


def _rewrite(path: Path, change) -> None:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def _first(tensors: dict) -> str:
    return sorted(tensors)[0]


TAMPERING = {
    "NaN": (lambda t, m: t[_first(t)].view(-1).__setitem__(0, math.nan), "holds NaN, Inf or non-float"),
    "wrong shape": (lambda t, m: t.__setitem__(_first(t), t[_first(t)][..., :-1].clone()), "expected"),
    "wrong dtype": (lambda t, m: t.__setitem__(_first(t), t[_first(t)].double()), "expected torch.float32"),
    "missing tensor": (lambda t, m: t.pop(_first(t)), "lacks 1 tensor"),
    "extra tensor": (lambda t, m: t.__setitem__("enc.x|A|weight", torch.zeros(2)), "does not have"),
    "another strategy": (
        lambda t, m: m.__setitem__("meta", json.dumps(json.loads(m["meta"]) | {"config": {"strategy.name": "x"}})),
        "is from a different run",
    ),
    "round after rounds": (lambda t, m: m.__setitem__("round", "9"), "is after round 9 but rounds=2"),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from fedlora.config.compose import compose

    return local_run(lambda *o: compose([*TINY, *o])[0], tmp_path_factory.mktemp("finished"))


@pytest.mark.parametrize("kind", [*TAMPERING, "truncated", "empty", "garbage"])
def test_a_tampered_checkpoint_is_refused_before_anything_starts(finished_run, tmp_path, capsys, kind) -> None:
    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    path = out / "checkpoint.safetensors"
    if kind in TAMPERING:
        _rewrite(path, TAMPERING[kind][0])
        expected = TAMPERING[kind][1]
    else:
        data = path.read_bytes()
        path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00not a file" * 9}[kind])
        expected = "is not a readable fedlora checkpoint"
    before = snapshot(out)
    assert main(["simulate", *RUN, "server.resume=true", f"output_dir={out}"]) == 2
    assert expected in one_error_line(capsys)
    assert snapshot(out) == before  # nothing rewritten (partitions.csv, config.yaml, run_config.json)


def test_a_run_that_aggregated_nothing_fails(make_config, tmp_path) -> None:
    out = local_run(make_config, tmp_path, "server.max_update_norm=1e-12")  # every reply rejected
    with pytest.raises(RunFailed, match="no round aggregated anything"):
        check_aggregated(out, min_replies=1)
    check_aggregated(local_run(make_config, tmp_path / "ok"), min_replies=1)  # a normal run passes
