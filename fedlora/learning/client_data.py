"""One run's data as one process sees it: the splits, the partitions, the tokenizer and each client's
tokenised partition, loaded once and cached (a process serves many clients in simulation)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedlora.config.run import RunConfig
from fedlora.learning.data import Splits, draw_test_shard, label_counts, load_splits, partition, shard_test_split
from fedlora.learning.model import model_folder
from fedlora.learning.tasks import Task
from fedlora.learning.train import MicroBatches
from fedlora.seeds import Stream, seed_of


class ClientData:
    """The splits of ``cfg.data`` cut into ``num_partitions`` parts, tokenised for ``task`` on first use.

    ``label_names``: the run's labels, when this process's data may hold only some of them."""

    def __init__(
        self, cfg: RunConfig, task: Task, *, num_partitions: int, label_names: tuple[str, ...] | None = None
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.num_partitions = num_partitions
        self.label_names = label_names
        self._tokenised: dict[int, Any] = {}
        self._offsets: dict[int, torch.Tensor] = {}  # partition -> its logit adjustment
        self._lengths: dict[int, list[int]] = {}  # partition -> token count of each example
        self._personal_tests: dict[int, tuple[list[int], Any]] = {}  # partition -> its test rows, ready

    @cached_property
    def splits(self) -> Splits:
        return load_splits(self.cfg.data, seed=self.cfg.seed, label_names=self.label_names)

    @cached_property
    def partitions(self) -> list[list[int]]:
        return partition(
            self.splits.train["label"], self.cfg.partition, num_partitions=self.num_partitions, seed=self.cfg.seed
        )

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return self.task.prepare_tokenizer(AutoTokenizer.from_pretrained(model_folder(self.cfg.model)))

    @cached_property
    def test_batches(self) -> Any:
        """What the task evaluates on (batches of the test split; a causal LM's ranking inputs too)."""
        train = self.cfg.train
        return self.task.evaluation_data(
            self.splits.test, self.tokenizer, max_len=train.max_seq_len, labels=self.splits.label_names,
            batch_size=train.eval_batch_size,
        )  # fmt: skip

    @cached_property
    def test_shards(self) -> list[list[int]]:
        """Each client's share of the test split in its partition's label mix (:func:`.data.shard_test_split`)."""
        labels = self.splits.train["label"] if "label" in self.splits.train.column_names else None
        if labels is None:  # instruction records: one mix
            n = len(self.splits.test)
            return [list(range(n))[k :: self.num_partitions] for k in range(self.num_partitions)]
        counts = label_counts(labels, self.partitions, len(self.splits.label_names))
        return shard_test_split(counts, self.splits.test["label"], seed=self.cfg.seed)

    def test_shard(self, partition_id: int) -> list[int]:
        """Client ``partition_id``'s rows of the test split (a node's own file: its labels' test rows)."""
        return self.test_shards[0 if self.num_partitions == 1 else partition_id]

    def released_test_shard(self, partition_id: int, mix: list[float]) -> list[int]:
        """Under DP: client ``partition_id``'s test rows drawn in the label mix ``mix`` of the label counts it
        released (noised and charged), not of its private ones; a 1/clients share of the test split drawn
        with a seed anyone can know (:func:`.data.draw_test_shard`; clients' draws may overlap)."""
        n, seed = len(self.splits.test), seed_of(Stream.PERSONAL_TEST, self.cfg.seed, client=partition_id)
        return draw_test_shard(mix, self.splits.test["label"], size=max(1, round(n / self.num_partitions)), seed=seed)

    def personal_test_batches(self, partition_id: int, rows: list[int]) -> Any:
        """What the task evaluates client ``partition_id``'s model on: its test ``rows`` (tokenised once per
        process while they stay the same, then reused every evaluated round)."""
        held = self._personal_tests.get(partition_id)
        if held is None or held[0] != rows:
            train = self.cfg.train
            self._personal_tests[partition_id] = rows, self.task.evaluation_data(
                self.splits.test.select(rows), self.tokenizer, max_len=train.max_seq_len,
                labels=self.splits.label_names, batch_size=train.eval_batch_size,
            )  # fmt: skip
        return self._personal_tests[partition_id][1]

    def rows(self, partition_id: int) -> list[int]:
        """Client ``partition_id``'s rows of the training split: its partition, or all of them when the
        data is not split (``num_partitions`` 1: a node's own file)."""
        if self.num_partitions == 1:
            return self.partitions[0]
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(f"partition-id {partition_id} outside 0..{self.num_partitions - 1}")
        return self.partitions[partition_id]

    def tokenised(self, partition_id: int) -> Any:
        """The tokenised partition, cached: tokenised on first use by this process."""
        if partition_id not in self._tokenised:
            rows = self.splits.train.select(self.rows(partition_id))
            self._tokenised[partition_id] = self.task.tokenize(
                rows, self.tokenizer, max_len=self.cfg.train.max_seq_len, labels=self.splits.label_names
            )
        return self._tokenised[partition_id]

    def lengths(self, partition_id: int) -> list[int]:
        """The token count of each of the client's examples (cached): physical batches group similar lengths."""
        if partition_id not in self._lengths:
            self._lengths[partition_id] = [len(ids) for ids in self.tokenised(partition_id)["input_ids"]]
        return self._lengths[partition_id]

    def label_offset(self, partition_id: int) -> torch.Tensor | None:
        """The client's logit adjustment from its exact label counts (``train.logit_adjustment``; None when
        off), computed once per process. Under DP see :meth:`noised_prior`."""
        tau = self.cfg.train.logit_adjustment
        if not tau:
            return None
        if partition_id not in self._offsets:
            labels = self.tokenised(partition_id)["labels"]
            self._offsets[partition_id] = self.task.label_offset(labels, len(self.splits.label_names), tau=tau)
        return self._offsets[partition_id]

    def noised_prior(self, partition_id: int, generator: torch.Generator) -> tuple[torch.Tensor | None, int | None]:
        """Under DP: this round's label counts noised by ``privacy.label_noise`` from ``generator`` (a release,
        charged with the round); (the counts, the example count they sum to, at least 1). (None, None) when
        logit adjustment is off. Their logit adjustment: ``task.prior_offset(counts, tau=...)``."""
        if not self.cfg.train.logit_adjustment:
            return None, None
        labels, noise = self.tokenised(partition_id)["labels"], self.cfg.privacy.label_noise
        counts = self.task.label_counts(labels, len(self.splits.label_names), noise_std=noise, generator=generator)
        return counts, max(1, round(float(counts.sum())))

    def shuffled(self, data: Any, *, seed: int, micro: bool = False) -> DataLoader | MicroBatches:
        """Training batches in a seeded order; also seeds dropout, which draws from torch's global generator.

        ``micro`` (with ``train.micro_batch_size``): the same batches, each as its length-ordered
        micro-batches (:class:`MicroBatches`)."""
        torch.manual_seed(seed)
        pieces = self.cfg.train.micro_batch_size if micro else None
        collate = self.task.collate(self.tokenizer)
        batches = DataLoader(
            data,
            batch_size=self.cfg.train.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=collate if pieces is None else list,
        )
        return batches if pieces is None else MicroBatches(batches, size=pieces, collate=collate)
