"""Logit adjustment against label skew (``train.logit_adjustment``): the math, the defaults, what it changes."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from fedlora.config.run import ConfigError
from fedlora.learning.classification import SequenceClassification
from fedlora.learning.worker import Worker


def record_offsets(monkeypatch) -> list[torch.Tensor | None]:
    """The label offset of every training loss computed from now on (None: plain cross-entropy)."""
    seen: list[torch.Tensor | None] = []
    plain_loss = SequenceClassification.loss

    def recording(self, model, batch, criterion=None, offset=None):
        seen.append(offset)
        return plain_loss(self, model, batch, criterion, offset)

    monkeypatch.setattr(SequenceClassification, "loss", recording)
    return seen


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
    assert dp.train.logit_adjustment == 1.0  # from noised counts, charged (below)
    assert make_config("train.logit_adjustment=0").train.logit_adjustment == 0.0
    with pytest.raises(ConfigError, match="must be >= 0"):
        make_config("train.logit_adjustment=-1")
    with pytest.raises(ConfigError, match=r"privacy\.label_noise must be > 0"):
        make_config("privacy=dp", "privacy.noise_multiplier=1.0", "privacy.label_noise=0")


def test_noised_counts_are_counts_plus_gaussian_noise_floored_at_zero() -> None:
    labels = [0] * 3000 + [1] * 1000 + [2] * 5
    draw = partial(SequenceClassification.label_offset, labels, 3, tau=1.0, noise_std=50.0)
    first, again = draw(generator=torch.Generator().manual_seed(1)), draw(generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, again)  # the noise is the generator's (private OS entropy in a run)
    noise = torch.normal(0.0, 50.0, (3,), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    counts = (torch.tensor([3000.0, 1000.0, 5.0], dtype=torch.float64) + noise).clamp(min=0)
    torch.testing.assert_close(first, torch.log((counts + 1) / (counts.sum() + 3)).float())
    exact = SequenceClassification.label_offset(labels, 3, tau=1.0)
    assert not torch.equal(first, exact)
    # large counts keep their prior (50 in 3000 moves log pi by about 0.02); huge noise stays finite
    assert (first[:2] - exact[:2]).abs().max() < 0.2
    assert torch.isfinite(draw(noise_std=1e6, generator=torch.Generator().manual_seed(2))).all()


def test_under_dp_each_round_trains_on_a_fresh_noised_prior_and_charges_it(make_config, monkeypatch) -> None:
    cfg = make_config(
        "partition=dirichlet", "partition.alpha=0.3", "clients=4", "privacy=dp", "privacy.epsilon=8",
        "privacy.unsafe_seeded_randomness=true", "strategy.weighting=uniform",
    )  # fmt: skip
    worker = Worker(cfg, num_partitions=4)
    seen = record_offsets(monkeypatch)
    received = worker.adapted.protocol.download(worker.adapted.initial_state())
    pid = next(p for p in range(4) if worker.privacy_plan(p).rounds >= 2)  # one the schedule samples twice
    plan, history, offsets = worker.privacy_plan(pid), [], []
    for server_round in (1, 2):
        seen.clear()
        worker.train_round(pid, received, server_round=server_round, history=history)
        assert seen and all(o is not None and torch.equal(o, seen[0]) for o in seen)
        offsets.append(seen[0])
    exact = SequenceClassification.label_offset(worker.data.tokenised(pid)["labels"], 4, tau=1.0)
    assert not torch.equal(offsets[0], exact) and not torch.equal(offsets[0], offsets[1])  # drawn afresh
    assert history == 2 * plan.round_steps and (cfg.privacy.label_noise, 1.0, 1) in history
    assert plan.noise_multiplier > 0 and plan.planned() == plan.rounds * plan.round_steps  # calibrated with it
    assert plan.spent(plan.planned()) <= 8.0


def test_each_client_trains_with_its_own_label_offset_and_evaluation_is_plain(make_config, monkeypatch) -> None:
    cfg = make_config("partition=dirichlet", "partition.alpha=0.3", "clients=4", "train.logit_adjustment=0.7")
    worker = Worker(cfg, num_partitions=4)
    seen = record_offsets(monkeypatch)
    received = worker.adapted.protocol.download(worker.adapted.initial_state())
    for pid in (0, 1):
        seen.clear()
        worker.train_round(pid, received, server_round=1)
        want = SequenceClassification.label_offset(worker.data.tokenised(pid)["labels"], 4, tau=0.7)
        assert len(seen) == cfg.train.local_steps and all(torch.equal(o, want) for o in seen)
    assert not torch.equal(
        *(SequenceClassification.label_offset(worker.data.tokenised(p)["labels"], 4, tau=1) for p in (0, 1))
    )
    seen.clear()
    worker.evaluate(received)
    assert seen == []  # evaluation computes plain logits, never the training loss
