"""Every bad data file and every setting that would mean nothing: exit 2 with one line naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.config.compose import compose
from fedlora.config.run import ConfigError
from fedlora.learning.data import load_splits

GOOD = "text,label\n" + "".join(f"text number {i},{i % 3}\n" for i in range(30))


def run(capsys, *overrides: str) -> str:
    assert main(["simulate", "--dry-run", "model=tiny", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"text,label\n", "has a header but no rows"),
        (b"text,label\na,1\nb,\nc,0\n", "1 record(s) have no 'label' (first: record 2)"),
        ("text,label\nd\xe9j\xe0 vu,1\nb,0\n".encode("latin-1"), "is not utf-8 text (byte 0xe9 at offset 12, line 2)"),
        (b"text,label\n" + b"same,1\n" * 20, "1 label(s) [1]; a classifier needs at least 2"),
        (b'text,label\n"unclosed,1\n', "cannot be read"),
    ],
    ids=["empty", "header only", "empty label", "not utf-8", "one class", "broken quoting"],
)
def test_bad_data_files_exit_2_with_one_line(tmp_path: Path, capsys, content: bytes, message: str) -> None:
    path = tmp_path / "mine.csv"
    path.write_bytes(content)
    err = run(capsys, "data=files", f"data.path={path}")
    assert (message in err and str(path) in err) or "label(s)" in message


def test_train_and_test_files_with_different_columns(tmp_path: Path, capsys) -> None:
    (tmp_path / "train.csv").write_text(GOOD)
    (tmp_path / "test.csv").write_text("sentence,label\na,1\n")
    assert "have different columns" in run(capsys, "data=files", f"data.path={tmp_path}")


def test_an_unreadable_file_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "train.csv").mkdir()  # found as the train split, but it cannot be read as a file
    (tmp_path / "test.csv").write_text(GOOD)
    assert "train.csv cannot be read" in run(capsys, "data=files", f"data.path={tmp_path}")


def test_a_run_that_aggregated_nothing_exits_1(tmp_path: Path, monkeypatch, capsys) -> None:
    import fedlora.flower.simulation
    from fedlora.federation.stopping import Signals

    def nothing_accepted(cfg, **_):  # every reply of every round rejected
        from fedlora.outputs.metrics import MetricsLog, RoundStats, columns, round_row

        log = MetricsLog(Path(cfg.output_dir) / "metrics.csv", columns(cfg.privacy, ()))
        for r in range(cfg.rounds + 1):
            stats = RoundStats(replies_expected=2, replies_received=2, replies_rejected=2) if r else None
            log.append(round_row(r, {"test_accuracy": 0.25, "test_loss": 1.3}, stats, privacy=cfg.privacy, wall_s=0.1))
        log.close()
        return Signals()

    monkeypatch.setattr(fedlora.flower.simulation, "run_flower_simulation", nothing_accepted)
    assert main(["simulate", "model=tiny", "rounds=2", f"output_dir={tmp_path}"]) == 1
    assert "no round aggregated anything" in capsys.readouterr().err


def test_latin1_reads_with_data_encoding(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_bytes(("text,label\n" + "".join(f"d\xe9j\xe0 {i},{i % 2}\n" for i in range(20))).encode("latin-1"))
    cfg, _ = compose(["data=files", f"data.path={path}", "data.encoding=latin-1"])
    splits = load_splits(cfg.data, seed=0)
    assert "déjà" in splits.train["text"][0] and splits.label_names == ("0", "1")


def test_a_changed_file_is_never_served_stale(tmp_path: Path) -> None:
    """Same size, same modification time, other labels: read again, not from a cache."""
    import os

    path = tmp_path / "mine.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(20)))
    stat = path.stat()
    cfg, _ = compose(["data=files", f"data.path={path}", "data.test_fraction=0.5"])
    assert load_splits(cfg.data, seed=0).label_names == ("a", "b")
    path.write_text("text,label\n" + "".join(f"t{i},{'xy'[i % 2]}\n" for i in range(20)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_splits(cfg.data, seed=0).label_names == ("x", "y")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lr=inf"], "train.lr must be a finite number, got inf"),
        (["train.lr=nan"], "train.lr must be"),
        (["privacy.epsilon=0.5"], "privacy.epsilon has no effect: this run is not private"),
        (["+privacy.foo=1"], "unknown config key 'privacy.foo'"),
        (["lora.target_modules=[query,nothere]"], "['nothere'] match no module"),
        (["train.max_seq_len=100000"], "exceeds the model's maximum of 512 positions"),
    ],
)
def test_settings_that_would_mean_nothing_are_refused(capsys, overrides, message) -> None:
    assert message in run(capsys, *overrides)


def test_dp_keys_are_fine_with_dp() -> None:
    assert compose(["privacy=dp", "privacy.epsilon=0.5"])[0].privacy.epsilon == 0.5
    with pytest.raises(ConfigError):
        compose(["privacy=none", "privacy.delta=1e-6"])


def test_a_label_column_of_numbers_and_words_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "mixed.csv"
    path.write_text("text,label\n" + "".join(f"text {i},{'sports' if i % 2 else 0}\n" for i in range(20)))
    assert "mixes numbers and words (e.g. '0' and 'sports')" in run(capsys, "data=files", f"data.path={path}")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "loop"])
def test_data_that_is_not_a_regular_file_is_named_not_read(tmp_path: Path, capsys, kind: str) -> None:
    """A FIFO hung the run, a symlink to /dev/zero filled the memory, a symlink loop was called missing."""
    import os

    path = tmp_path / "data.csv"
    if kind == "fifo":
        os.mkfifo(path)
        expected = "it is a FIFO, not a regular file"
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
        expected = "it is a character device, not a regular file"
    else:
        path.symlink_to(tmp_path / "other.csv")
        (tmp_path / "other.csv").symlink_to(path)
        expected = "is a symlink loop"
    assert expected in run(capsys, "data=files", f"data.path={path}")


def test_an_impossible_epsilon_is_one_line_without_the_accountant_s_warnings(capsys, recwarn) -> None:
    assert "cannot be met with any noise multiplier" in run(capsys, "privacy=dp", "privacy.epsilon=1e-9")
    assert not [w for w in recwarn if "Optimal order" in str(w.message)]  # 22 of them printed before


def test_an_unquoted_value_hydra_cannot_read_gets_the_quoting_that_works(capsys) -> None:
    err = run(capsys, "data.text_column=Überschrift (de)")
    assert 'quote it, data.text_column="Überschrift (de)"' in err and "LexerNoViableAlt" not in err
    quoted = run(capsys, 'data.text_column="Überschrift (de)"')  # the quoting it suggests is read
    assert "is not a column of the data" in quoted


def test_a_preset_without_its_files_names_the_public_set_and_an_unreachable_hub_is_one_line(
    capsys, monkeypatch
) -> None:
    """A fresh clone has no ../shared: data=sst2 says where the data can come from; fetching it from the
    Hub without a network (HF_HUB_OFFLINE here) is one line that says what to do, not datasets' traceback."""
    out = run(capsys, "data=sst2")
    assert "data.path is required for data=sst2" in out and "data.hub_name=stanfordnlp/sst2" in out
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: as the env var would
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    out = run(capsys, "data=ag_news", "data.hub_name=fancyzhx/ag_news")
    assert out.startswith("error: data.hub_name=fancyzhx/ag_news could not be loaded")
    assert "give data.path to the files" in out and "Traceback" not in out
