"""Logit adjustment against label skew (``train.logit_adjustment``): the math, the defaults, what it changes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedlora.config import ConfigError
from fedlora.task import SequenceClassification
from fedlora.worker import Worker


def test_offset_is_tau_log_of_the_smoothed_label_frequencies() -> None:
    offset = SequenceClassification.label_offset([0, 0, 0, 1], 3, tau=0.5)
    want = [0.5 * math.log(4 / 7), 0.5 * math.log(2 / 7), 0.5 * math.log(1 / 7)]  # add-one: absent labels stay finite
    torch.testing.assert_close(offset, torch.tensor(want))


def test_the_loss_is_cross_entropy_of_the_shifted_logits() -> None:
    class Fixed(nn.Module):
        def forward(self, **inputs):
            return type("Out", (), {"logits": torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])})()

    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.tensor([1, 0])}
    offset = torch.tensor([0.3, -2.0, 0.1])
    got = SequenceClassification().loss(Fixed(), batch, offset=offset)
    want = nn.functional.cross_entropy(Fixed()().logits + offset, batch["labels"])
    torch.testing.assert_close(got, want)


def test_defaults_and_refusals(make_config) -> None:
    assert make_config().train.logit_adjustment == 1.0
    dp = make_config("privacy=dp", "privacy.noise_multiplier=1.0", "strategy.weighting=uniform")
    assert dp.train.logit_adjustment == 0.0
    assert make_config("train.logit_adjustment=0").train.logit_adjustment == 0.0
    with pytest.raises(ConfigError, match="DP-SGD's per-example guarantee"):
        make_config("privacy=dp", "privacy.noise_multiplier=1.0", "train.logit_adjustment=1")
    with pytest.raises(ConfigError, match="must be >= 0"):
        make_config("train.logit_adjustment=-1")


def test_each_client_trains_with_its_own_label_offset_and_evaluation_is_plain(make_config, monkeypatch) -> None:
    cfg = make_config("partition=dirichlet", "partition.alpha=0.3", "clients=4", "train.logit_adjustment=0.7")
    worker = Worker(cfg, num_partitions=4)
    seen: list[torch.Tensor | None] = []
    plain_loss = SequenceClassification.loss

    def recording(self, model, batch, criterion=None, offset=None):
        seen.append(offset)
        return plain_loss(self, model, batch, criterion, offset)

    monkeypatch.setattr(SequenceClassification, "loss", recording)
    received = worker.protocol.download(worker.initial_state())
    for pid in (0, 1):
        seen.clear()
        worker.train_round(pid, received, server_round=1)
        want = SequenceClassification.label_offset(worker.client_data(pid)["labels"], 4, tau=0.7)
        assert len(seen) == cfg.train.local_steps and all(torch.equal(o, want) for o in seen)
    assert not torch.equal(
        *(SequenceClassification.label_offset(worker.client_data(p)["labels"], 4, tau=1) for p in (0, 1))
    )
    seen.clear()
    worker.evaluate(received)
    assert seen == []  # evaluation computes plain logits, never the training loss
