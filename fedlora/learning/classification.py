"""``task=classification``: an encoder with a linear head, cross-entropy (with logit adjustment against
label skew), accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)


class SequenceClassification:
    """Encoder + linear head, cross-entropy loss, accuracy."""

    name: ClassVar[str] = "classification"
    metric_columns: ClassVar[tuple[str, ...]] = ()
    peft_task_type: ClassVar[str] = "SEQ_CLS"
    # Heads that HF sequence-classification models create fresh (BERT/RoBERTa: classifier,
    # decoder models: score); they are trained in full (peft's modules_to_save).
    head_names = ("classifier", "score")

    def build(self, path: str, *, labels: tuple[str, ...], pretrained: bool, architecture: dict[str, int]) -> nn.Module:
        """The base model with a head for ``labels`` (named in its config): pretrained weights, or a random init
        of ``path``'s config."""
        names = {"num_labels": len(labels), "id2label": dict(enumerate(labels))}
        names["label2id"] = {name: i for i, name in enumerate(labels)}
        if pretrained:
            return AutoModelForSequenceClassification.from_pretrained(path, **names, **architecture)
        config = AutoConfig.from_pretrained(path, **names, **architecture)
        return AutoModelForSequenceClassification.from_config(config)

    def heads(self, model: nn.Module) -> list[str]:
        """The names of ``model``'s head modules (peft's modules_to_save)."""
        return [name for name in self.head_names if isinstance(getattr(model, name, None), nn.Module)]

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        return tokenizer

    def check_room(self, tokenizer: PreTrainedTokenizerBase, *, labels: tuple[str, ...], max_len: int) -> None:
        """Nothing to check: a classifier truncates its texts to max_len."""

    def tokenize(
        self, data: Dataset, tokenizer: PreTrainedTokenizerBase, *, max_len: int, labels: tuple[str, ...] = ()
    ) -> Dataset:
        """input_ids/attention_mask (unpadded, truncated to max_len) and labels."""

        def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
            enc = tokenizer(batch["text"], truncation=True, max_length=max_len)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": batch["label"]}

        return data.map(encode, batched=True, remove_columns=data.column_names, keep_in_memory=True)

    def collate(self, tokenizer: PreTrainedTokenizerBase) -> DataCollatorWithPadding:
        """Pads each batch to its longest sequence (not to max_len: short texts stay cheap)."""
        return DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def criterion(self) -> nn.Module:
        """The loss on (logits, labels), mean over the batch (Opacus's ghost clipping wraps it)."""
        return nn.CrossEntropyLoss()

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        criterion: nn.Module | None = None,
        offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of the logits, plus ``offset`` per class when given (:func:`label_offset`)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        if offset is not None:
            logits = logits + offset.to(logits.device, logits.dtype)
        return (criterion or self.criterion())(logits, batch["labels"])

    @staticmethod
    def label_counts(
        labels: list[int], num_labels: int, *, noise_std: float = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """How many of ``labels`` have each class (float64); under DP (``noise_std`` > 0) plus N(0, noise_std^2)
        noise from ``generator`` (a Gaussian release: one record moves one count by 1), floored at 0."""
        counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_labels).double()
        if noise_std > 0:
            noise = torch.normal(0.0, noise_std, (num_labels,), generator=generator, dtype=torch.float64)
            counts = (counts + noise).clamp(min=0.0)
        return counts

    @staticmethod
    def prior_offset(counts: torch.Tensor, *, tau: float) -> torch.Tensor:
        """tau log pi, pi the add-one smoothed frequencies of the class ``counts``."""
        return (tau * torch.log((counts + 1) / (counts.sum() + len(counts)))).float()

    @classmethod
    def label_offset(
        cls,
        labels: list[int],
        num_labels: int,
        *,
        tau: float,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """tau log pi, pi the add-one smoothed label frequencies of ``labels``: logit adjustment.

        Training on CE(logits + tau log pi) (Menon et al., ICLR 2021; the balanced softmax at
        tau = 1) fits the logits to p(x | y) rather than to the client's label mix, so a
        client that holds few classes no longer drives the others' logits down, and the
        average over clients is not pulled towards each client's majority: what plain local
        cross-entropy does under label skew (FedLC, Zhang et al., ICML 2022, corrects the
        same way). Evaluation uses the plain logits.

        Under DP (``noise_std`` > 0) the counts are noised first (:meth:`label_counts`).
        """
        counts = cls.label_counts(labels, num_labels, noise_std=noise_std, generator=generator)
        return cls.prior_offset(counts, tau=tau)

    def evaluation_data(
        self, data: Dataset, tokenizer: PreTrainedTokenizerBase, *, max_len: int, labels: tuple[str, ...],
        batch_size: int,
    ) -> DataLoader:  # fmt: skip
        """The test split in batches of similar lengths: accuracy and loss are sums over the examples, so the order
        changes nothing but the padding (on AG News at max_len 64, a fifth of the tokens a random order pads to)."""
        tokenized = self.tokenize(data, tokenizer, max_len=max_len)
        lengths = [len(ids) for ids in tokenized["input_ids"]]
        tokenized = tokenized.select(sorted(range(len(lengths)), key=lengths.__getitem__))
        return DataLoader(tokenized, batch_size=batch_size, collate_fn=self.collate(tokenizer))

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
        *, accuracy_only: bool = False,
    ) -> dict[str, float]:  # fmt: skip
        """Accuracy and mean cross-entropy over all examples (all there is: ``accuracy_only`` changes nothing)."""
        was_training = model.training
        model.eval()
        correct, total, loss_sum = 0, 0, 0.0
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"]
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            total += len(labels)
        model.train(was_training)
        return {"accuracy": correct / total, "loss": loss_sum / total if total else math.nan}
