"""Users' data files: found, read and checked, one line per problem naming the file.

Read with pandas, in memory, on every run (not ``datasets.load_dataset``, whose shared
cache keeps an Arrow copy of the rows, world-readable, and can serve a changed file
stale); then handed to ``datasets`` as in-memory tables.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from datasets import Dataset, DatasetDict

from fedlora.config.groups import ConfigError, DataConfig

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_files(cfg: DataConfig, *, seed: int) -> DatasetDict:
    path = Path(cfg.path).expanduser()
    _check_links(path)
    if not path.exists():
        raise ConfigError(f"data.path {str(path)!r} does not exist")
    if path.is_dir():
        files = {
            split: _find_split(path, stem) for split, stem in (("train", cfg.train_split), ("test", cfg.test_split))
        }
    else:
        files = {"train": path}
    for f in files.values():
        _check_links(f)
        if not f.is_file():  # a FIFO would hang the read, /dev/zero fill the memory
            raise ConfigError(f"data file {f} cannot be read: it is {_kind(f)}, not a regular file")
    suffixes = {f.suffix.lower() for f in files.values()}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _FORMATS:
        raise ConfigError(f"data.path: unsupported file type(s) {sorted(suffixes)}; use {sorted(_FORMATS)}")
    tables = {split: read_table(f, cfg) for split, f in files.items()}
    if "test" in tables and list(tables["test"].columns) != list(tables["train"].columns):
        raise ConfigError(
            f"data.path: {files['train']} and {files['test']} have different columns "
            f"({list(tables['train'].columns)} vs {list(tables['test'].columns)})"
        )
    raw = DatasetDict({split: Dataset.from_pandas(t, preserve_index=False) for split, t in tables.items()})
    if "test" not in raw:
        raw = raw["train"].train_test_split(test_size=cfg.test_fraction, seed=seed)
    return raw


def read_table(path: Path, cfg: DataConfig):
    """One data file as a pandas DataFrame of strings, read in memory on every call.

    pandas, not ``datasets.load_dataset``: the latter keeps an Arrow copy of the rows in a
    shared cache (world-readable, and served again when the file changes but keeps its
    modification time). Cells are strings (no "NA" -> NaN guessing); a label column of
    whole numbers becomes integers, as before. Every problem is one line naming the file.
    """
    import pandas as pd

    fmt = _FORMATS[path.suffix.lower()]
    try:
        if fmt == "parquet":
            table = pd.read_parquet(path)
        else:
            data = path.read_bytes()
            try:
                text = data.decode(cfg.encoding)
            except UnicodeDecodeError as err:
                line = data[: err.start].count(b"\n") + 1
                raise ConfigError(
                    f"data file {path} is not {cfg.encoding} text (byte {data[err.start]:#04x} at offset {err.start}, "
                    f"line {line}); set data.encoding (e.g. data.encoding=latin-1)"
                ) from None
            if fmt == "csv":
                table = pd.read_csv(
                    io.StringIO(text), sep=cfg.delimiter or ("\t" if path.suffix.lower() == ".tsv" else ","),
                    dtype=str, keep_default_na=False, na_filter=False,
                    quoting=csv.QUOTE_MINIMAL if cfg.quoting else csv.QUOTE_NONE,
                )  # fmt: skip
            else:
                lines = path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("[")
                table = pd.read_json(io.StringIO(text), lines=lines, dtype=False)
    except pd.errors.EmptyDataError:
        raise ConfigError(f"data file {path} is empty") from None
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ConfigError(f"data file {path} cannot be read: {str(err).splitlines()[0]}") from None
    if len(table) == 0:
        raise ConfigError(f"data file {path} has a header but no rows")
    for column in table.columns:
        if (missing := table[column].isna()).any():  # JSON or Parquet nulls
            first = int(missing.argmax()) + 1
            raise ConfigError(f"data file {path}: column {column!r} has empty values (first: record {first})")
    label = cfg.label_column
    if label in table.columns:
        labels = table[label].astype(str).str.strip()
        if (empty := labels == "").any():
            first = int(empty.argmax()) + 1
            count = int(empty.sum())
            raise ConfigError(f"data file {path}: {count} record(s) have no {label!r} (first: record {first})")
        numbers = labels.str.fullmatch(r"-?\d+")
        if numbers.all():
            table[label] = labels.astype("int64")
        elif numbers.any():  # "0" and "sports" would both become classes
            raise ConfigError(
                f"data file {path}: column {label!r} mixes numbers and words (e.g. {labels[numbers].iloc[0]!r} and "
                f"{labels[~numbers].iloc[0]!r}); use one kind of label"
            )
    return table


def _find_split(folder: Path, stem: str) -> Path:
    matches = sorted(p for p in folder.iterdir() if p.stem == stem and p.suffix.lower() in _FORMATS)
    if not matches:
        raise ConfigError(f"data.path {str(folder)!r} has no {stem}.* file ({'/'.join(sorted(_FORMATS))})")
    return matches[0]


def _check_links(path: Path) -> None:
    """A symlink loop is named as one (``exists()`` would call it missing)."""
    try:
        path.resolve(strict=True)
    except FileNotFoundError:
        return  # missing: said by the caller
    except (RuntimeError, OSError) as err:  # RuntimeError: Python's own loop detection; OSError: ELOOP
        if "loop" in str(err).lower() or getattr(err, "errno", None) == 40:
            raise ConfigError(f"data.path {str(path)!r} is a symlink loop") from None
        raise


def _kind(path: Path) -> str:
    import stat

    mode = path.stat().st_mode
    kinds = (
        (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
    )  # fmt: skip
    for test, name in kinds:
        if test(mode):
            return name
    return "not a file"
