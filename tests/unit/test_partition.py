"""Partitioning: deterministic for a seed, sizes add up, label skew follows alpha."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.config.run import ConfigError, PartitionConfig
from fedlora.learning.data import label_counts, label_skew, partition


@pytest.fixture(scope="module")
def labels() -> list[int]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 4, size=2000).tolist()


@pytest.mark.parametrize("name", ["iid", "dirichlet", "pathological"])
def test_partitions_cover_every_row_exactly_once(labels: list[int], name: str) -> None:
    parts = partition(labels, PartitionConfig(name=name), num_partitions=20, seed=1)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(labels)))
    assert sum(len(p) for p in parts) == len(labels)
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "pathological"])
def test_partitions_are_deterministic_for_a_seed(labels: list[int], name: str) -> None:
    cfg = PartitionConfig(name=name)
    assert partition(labels, cfg, num_partitions=10, seed=3) == partition(labels, cfg, num_partitions=10, seed=3)
    assert partition(labels, cfg, num_partitions=10, seed=3) != partition(labels, cfg, num_partitions=10, seed=4)


def test_iid_is_balanced_and_unskewed(labels: list[int]) -> None:
    parts = partition(labels, PartitionConfig(name="iid"), num_partitions=10, seed=0)
    assert {len(p) for p in parts} == {200}
    assert label_skew(label_counts(labels, parts, 4)) < 0.1


def test_dirichlet_skew_grows_as_alpha_falls(labels: list[int]) -> None:
    def skew(alpha: float) -> float:
        parts = partition(labels, PartitionConfig(name="dirichlet", alpha=alpha), num_partitions=10, seed=0)
        return label_skew(label_counts(labels, parts, 4))

    skews = [skew(a) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2], skews


def test_pathological_gives_k_labels_per_client(labels: list[int]) -> None:
    parts = partition(labels, PartitionConfig(name="pathological", labels_per_client=2), num_partitions=8, seed=0)
    counts = label_counts(labels, parts, 4)
    assert ((counts > 0).sum(1) <= 2).all()


def test_label_skew_bounds() -> None:
    assert label_skew(np.array([[5, 5], [5, 5]])) == 0.0
    assert label_skew(np.array([[10, 0], [0, 10]])) == pytest.approx(0.5)  # 1 - 1/K


def test_more_clients_than_examples_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"clients \(11\) exceeds the training examples \(10\)"):
        partition([0, 1] * 5, PartitionConfig(), num_partitions=11, seed=0)


def test_too_many_labels_per_client_is_refused(labels: list[int]) -> None:
    with pytest.raises(ConfigError, match="labels_per_client"):
        partition(labels, PartitionConfig(name="pathological", labels_per_client=5), num_partitions=4, seed=0)


def test_string_and_sparse_labels_become_0_to_k_minus_1(tmp_path) -> None:
    from fedlora.config.run import DataConfig
    from fedlora.learning.data import load_splits

    (tmp_path / "train.csv").write_text("text,label\n" + "a b,pos\nc d,neg\ne f,pos\n" * 4)
    (tmp_path / "test.csv").write_text("text,label\ng h,neg\ni j,pos\n")
    splits = load_splits(DataConfig(name="files", path=str(tmp_path)), seed=0)
    assert splits.label_names == ("neg", "pos")
    assert splits.train.features["label"].dtype == "int64"
    assert sorted(set(splits.train["label"])) == [0, 1] and splits.test["label"] == [0, 1]


def test_the_partition_table_summarises_clients_when_labels_are_many(capsys) -> None:
    """14 labels made 14 columns cut to 'c…'; above 8 each client shows its label count and largest label."""
    from types import SimpleNamespace

    from fedlora.config.groups import PartitionConfig
    from fedlora.outputs.console import show_partitions

    names = tuple(f"category-{i}" for i in range(14))
    labels = [i % 14 for i in range(280)]
    parts = partition(labels, PartitionConfig(name="pathological", labels_per_client=2), num_partitions=10, seed=0)
    splits = SimpleNamespace(train={"label": labels}, num_labels=14, label_names=names)
    cfg = SimpleNamespace(partition=SimpleNamespace(name="pathological"), clients=10)
    counts = show_partitions(SimpleNamespace(cfg=cfg, data=SimpleNamespace(splits=splits, partitions=parts)))
    out = capsys.readouterr().out
    assert "labels held" in out and "2 of 14" in out and "category-" in out and "c…" not in out
    assert counts.shape == (10, 14)
