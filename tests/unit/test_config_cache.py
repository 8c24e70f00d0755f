"""The cache of what is made once: the App's run-config defaults read back equal to the derived ones, a
changed source makes a new entry, a damaged or unwritable cache costs time, never a wrong value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.config import app
from fedlora.config.cache import digest, json_once


def test_cached_app_defaults_equal_the_derived_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    derived = dict(app._derive_defaults())
    app._defaults.cache_clear()
    try:
        first = app.app_defaults()  # derives and writes
        (entry,) = (tmp_path / "app-defaults").glob("*.json")
        app._defaults.cache_clear()
        second = app.app_defaults()  # reads the file
    finally:
        app._defaults.cache_clear()
    assert first == second == derived
    assert [type(v) for v in second.values()] == [type(v) for v in derived.values()]  # 8 stays int, 8.0 float
    assert entry.stem == app._sources_digest()


def test_a_changed_source_changes_the_key(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("rank: 8\n")
    b.write_text("lr: 0.005\n")
    before = digest([a, b], tmp_path)
    assert digest([b, a], tmp_path) == before  # order of listing does not matter
    a.write_text("rank: 16\n")
    assert digest([a, b], tmp_path) != before
    a.write_text("rank: 8\n")
    b.rename(tmp_path / "c.yaml")  # same contents under another name
    assert digest([a, tmp_path / "c.yaml"], tmp_path) != before


def test_a_damaged_entry_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    (tmp_path / "kind").mkdir()
    (tmp_path / "kind" / "key.json").write_text('{"half a wri')
    assert json_once("kind", "key", lambda: {"a": 1}) == {"a": 1}
    assert json.loads((tmp_path / "kind" / "key.json").read_text()) == {"a": 1}
    assert json_once("kind", "key", lambda: pytest.fail("made again although kept")) == {"a": 1}


def test_an_unwritable_cache_still_gives_the_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FEDLORA_CACHE", str(blocker))  # mkdir under a file fails
    assert json_once("kind", "key", lambda: [1, 2]) == [1, 2]
