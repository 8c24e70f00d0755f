"""Data: load a text-classification set, split it across clients, tokenise it.

Every set is normalised to two columns, ``text`` (str) and ``label`` (int in
0..K-1). Partitions are lists of row indices into the training split, computed
by flwr-datasets partitioners on a small (index, label) table, so they are cheap
to recompute in every process and identical everywhere for a given seed.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value, concatenate_datasets, load_dataset

from fedlora.config.groups import ConfigError, DataConfig, PartitionConfig
from fedlora.learning.files import load_files
from fedlora.learning.synthetic import synthetic_topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Splits:
    """Train and test sets with columns ``text`` and ``label``; ``label_names[i]`` names label i."""

    train: Dataset
    test: Dataset
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def load_splits(cfg: DataConfig, *, seed: int, label_names: tuple[str, ...] | None = None) -> Splits:
    """Load ``cfg``'s data set as normalised train/test splits (subsampled if asked).

    ``label_names``: the run's labels (a node's own file may hold a subset); labels are
    then mapped to them by name, so that label i means the same on every node.
    """
    if cfg.name == "synthetic" and cfg.path is None and cfg.hub_name is None:
        raw = synthetic_topics(
            cfg.synthetic_train, cfg.synthetic_test, seed=seed, label_noise=cfg.synthetic_label_noise
        )
    elif cfg.path is not None:
        raw = load_files(cfg, seed=seed)
    else:
        raw = from_hub(cfg)
    splits = _normalise(raw, cfg)
    if label_names is not None and splits.label_names != tuple(label_names):
        splits = Splits(
            *(_relabel(ds, splits.label_names, label_names, what="data.path") for ds in (splits.train, splits.test)),
            tuple(label_names),
        )
    train, test = splits.train, splits.test
    if cfg.max_train_examples is not None and len(train) > cfg.max_train_examples:
        train = train.shuffle(seed=seed).select(range(cfg.max_train_examples))
    if cfg.max_test_examples is not None and len(test) > cfg.max_test_examples:
        test = test.shuffle(seed=seed).select(range(cfg.max_test_examples))
    return Splits(train, test, splits.label_names)


def from_hub(cfg: DataConfig) -> DatasetDict:
    """``data.hub_name``'s train and test splits through ``datasets`` (the network once, then its cache);
    unreachable or unknown: one line that says what to do."""
    try:
        raw = load_dataset(cfg.hub_name)
    except (ConnectionError, OSError, ValueError) as err:  # offline, unknown repo, no such config
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"data.hub_name={cfg.hub_name} could not be loaded ({reason}): without a network, fetch it once where "
            "there is one (datasets caches it), or give data.path to the files"
        ) from None
    missing = [s for s in (cfg.train_split, cfg.test_split) if s not in raw]
    if missing:
        raise ConfigError(f"data.hub_name={cfg.hub_name} has no split(s) {missing}; its splits: {list(raw)} "
                          "(data.train_split, data.test_split)")  # fmt: skip
    return DatasetDict({"train": raw[cfg.train_split], "test": raw[cfg.test_split]})


def load_calibration(cfg: DataConfig, path: str, *, label_names: tuple[str, ...]) -> Dataset:
    """All rows of a calibration file in ``cfg``'s format, labels mapped by name to ``label_names``."""
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"calibration file {path!r} does not exist (give 'clients' or a file)")
    raw = load_files(dataclasses.replace(cfg, path=path), seed=0)
    splits = _normalise(raw, cfg)
    rows = concatenate_datasets([splits.train, splits.test])
    return _relabel(rows, splits.label_names, label_names, what="calibration")


def _relabel(ds: Dataset, names: tuple[str, ...], label_names: tuple[str, ...], *, what: str) -> Dataset:
    """``ds``'s labels (indices into ``names``) as indices into ``label_names``, matched by name."""
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ConfigError(f"{what} labels {unknown[:5]} are not labels of the run's data set {list(label_names)}")
    to_run = [index[name] for name in names]
    return _map_labels(ds, lambda label: to_run[label])


def _map_labels(ds: Dataset, fn) -> Dataset:
    """``label`` <- fn(label) as int64 (without ``features``, datasets keeps a string column's type)."""
    features = ds.features.copy()
    features["label"] = Value("int64")
    return ds.map(lambda row: {"label": fn(row["label"])}, features=features, keep_in_memory=True)


def _normalise(raw: DatasetDict, cfg: DataConfig) -> Splits:
    columns = raw["train"].column_names
    if cfg.label_column not in columns and cfg.instruction_column in columns:
        return _instructions(raw, cfg)
    for key in ("text_column", "label_column"):
        name = getattr(cfg, key)
        if name not in columns:
            raise ConfigError(f"data.{key} {name!r} is not a column of the data; columns: {columns}")
    out = {}
    for split in ("train", "test"):
        ds = raw[split].select_columns([cfg.text_column, cfg.label_column])
        if cfg.text_column != "text":
            ds = ds.rename_column(cfg.text_column, "text")
        if cfg.label_column != "label":
            ds = ds.rename_column(cfg.label_column, "label")
        out[split] = ds
    feature = out["train"].features["label"]
    if isinstance(feature, ClassLabel):
        return Splits(out["train"], out["test"], tuple(feature.names))
    # Map the training labels' sorted values to 0..K-1 (identity for labels already 0..K-1).
    values = sorted(set(out["train"]["label"]))
    if len(values) < 2:
        raise ConfigError(f"the training data has {len(values)} label(s) {values}; a classifier needs at least 2")
    index = {v: i for i, v in enumerate(values)}
    unseen = set(out["test"]["label"]) - set(index)
    if unseen:
        raise ConfigError(f"test labels {sorted(unseen)[:5]} never occur in the training split")
    if list(index) != list(range(len(values))):
        out = {s: _map_labels(ds, lambda label: index[label]) for s, ds in out.items()}
    return Splits(out["train"], out["test"], tuple(str(v) for v in values))


def _instructions(raw: DatasetDict, cfg: DataConfig) -> Splits:
    """Instruction records as ``text`` (the instruction, and its input after a blank line), ``response``
    (the output) and a constant ``label`` 0; no label names (free-form text, not classes)."""
    columns = raw["train"].column_names
    if cfg.output_column not in columns:
        raise ConfigError(
            f"instruction records need an output column: data.output_column {cfg.output_column!r} is not a column "
            f"of the data; columns: {columns}"
        )

    def record(row: dict) -> dict:
        given = row.get(cfg.input_column) or ""
        prompt = str(row[cfg.instruction_column]) + (f"\n\n{given}" if str(given).strip() else "")
        return {"text": prompt, "response": str(row[cfg.output_column]), "label": 0}

    out = {s: raw[s].map(record, remove_columns=raw[s].column_names, keep_in_memory=True) for s in ("train", "test")}
    return Splits(out["train"], out["test"], ())


# -- partitioning -------------------------------------------------------------------
def partition(labels: list[int], cfg: PartitionConfig, *, num_partitions: int, seed: int) -> list[list[int]]:
    """Row indices of each client's partition, deterministic for ``seed``.

    The rows are shuffled (seeded) before partitioning, so IID shards do not follow
    the file's order; flwr-datasets then assigns them.
    """
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner

    y = np.asarray(labels if isinstance(labels, list | np.ndarray) else list(labels))  # a datasets Column: read once
    n = len(y)
    if num_partitions > n:
        raise ConfigError(f"clients ({num_partitions}) exceeds the training examples ({n})")
    num_labels = len(np.unique(y))
    order = np.random.default_rng(seed).permutation(n)
    if cfg.name == "iid":  # IidPartitioner's contiguous shards of the shuffled rows, without a table per shard
        return [part.tolist() for part in np.array_split(order, num_partitions)]
    table = Dataset.from_dict({"idx": order.tolist(), "label": y[order].tolist()})
    if cfg.name == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    else:
        if cfg.labels_per_client > num_labels:
            raise ConfigError(
                f"partition.labels_per_client ({cfg.labels_per_client}) exceeds the labels ({num_labels})"
            )
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=cfg.labels_per_client,
            seed=seed,
        )
    partitioner.dataset = table
    try:
        first = partitioner.load_partition(0)["idx"]  # assigns every partition's rows at once
    except ValueError as err:  # e.g. Dirichlet cannot reach min_partition_size
        raise ConfigError(f"partition={cfg.name}: {err}".splitlines()[0]) from None
    # The assignment, read from the partitioner instead of one table per client (load_partition builds and
    # fingerprints a Dataset for each: 2 ms a client, 40 s for 20,000). Checked against load_partition(0).
    assigned = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(assigned, dict) and len(assigned) == num_partitions and list(order[assigned[0]]) == list(first):
        parts = [order[assigned[i]].tolist() for i in range(num_partitions)]
    else:
        parts = [first, *(partitioner.load_partition(i)["idx"] for i in range(1, num_partitions))]
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise ConfigError(
            f"partition={cfg.name} left {len(empty)} client(s) without data (e.g. client {empty[0]}); "
            "use fewer clients or a larger partition.alpha / labels_per_client"
        )
    return parts


def label_counts(labels: list[int], parts: list[list[int]], num_labels: int) -> np.ndarray:
    """(clients, labels) matrix of example counts."""
    y = np.asarray(labels if isinstance(labels, list | np.ndarray) else list(labels))
    return np.stack([np.bincount(y[p], minlength=num_labels) for p in parts])


def label_skew(counts: np.ndarray) -> float:
    """Mean total-variation distance between each client's label mix and the global one.

    0 for identical mixes; approaches 1 - 1/K when every client holds one label.
    """
    counts = np.asarray(counts, dtype=np.float64)
    global_mix = counts.sum(0) / counts.sum()
    client_mix = counts / counts.sum(1, keepdims=True)
    return float(0.5 * np.abs(client_mix - global_mix).sum(1).mean())


def largest_remainders(weight: np.ndarray, total: int) -> np.ndarray:
    """``total`` split in proportion to ``weight`` (positive sum) in whole numbers: the floors, then one more
    to the largest remainders (ties to the lower index)."""
    exact = total * weight / weight.sum()
    dealt = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - dealt), kind="stable")[: total - dealt.sum()]:
        dealt[k] += 1
    return dealt


def shard_test_split(counts: np.ndarray, test_labels: list[int], *, seed: int) -> list[list[int]]:
    """Each client's share of the test split, in the label mix of its training partition.

    ``counts``: the (clients, labels) training counts (:func:`label_counts`). Each label's test rows,
    shuffled with ``seed``, are dealt to the clients in proportion to their training examples of that
    label (largest remainders, ties to the lower client id): the shards are disjoint, every client's
    label mix follows its partition's, and a label no client trained on is left out. With one client
    (a node's own data), the whole test split.
    """
    y = np.asarray(test_labels if isinstance(test_labels, list | np.ndarray) else list(test_labels))
    counts = np.asarray(counts, dtype=np.float64)
    shards: list[list[int]] = [[] for _ in range(len(counts))]
    rng = np.random.default_rng(seed)
    for label in range(counts.shape[1]):
        rows = np.flatnonzero(y == label)
        rng.shuffle(rows)
        weight = counts[:, label]
        if weight.sum() == 0 or len(rows) == 0:
            continue
        dealt = largest_remainders(weight, len(rows))
        for k, (start, stop) in enumerate(zip(np.cumsum(dealt) - dealt, np.cumsum(dealt), strict=True)):
            shards[k].extend(rows[start:stop].tolist())
    return [sorted(shard) for shard in shards]


def draw_test_shard(mix: np.ndarray, test_labels: list[int], *, size: int, seed: int) -> list[int]:
    """``size`` rows of the test split in the label mix ``mix`` (non-negative weights, e.g. label counts),
    for one client alone: each label's share by largest remainders, its rows drawn with ``seed`` without
    replacement (at most all of them). Unlike :func:`shard_test_split`, no other client's counts are
    used, so under DP the mix can be a client's released (noised) counts; two clients' draws may overlap.
    """
    y = np.asarray(test_labels if isinstance(test_labels, list | np.ndarray) else list(test_labels))
    weight = np.clip(np.asarray(mix, dtype=np.float64), 0.0, None)
    if weight.sum() <= 0 or size <= 0:
        return []
    dealt = largest_remainders(weight, size)
    rng = np.random.default_rng(seed)
    rows: list[int] = []
    for label, k in enumerate(dealt):
        pool = np.flatnonzero(y == label)
        rows += rng.choice(pool, size=min(int(k), len(pool)), replace=False).tolist()
    return sorted(rows)
