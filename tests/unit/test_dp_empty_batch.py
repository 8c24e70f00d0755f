"""DP-SGD on a client so small that Poisson sampling draws empty batches: each is still a step, noised."""

from __future__ import annotations

import pytest
import torch
from opacus.optimizers import DPOptimizer

from fedlora.learning import train
from fedlora.learning.worker import Worker

SMALL = ["privacy=dp", "privacy.noise_multiplier=1.0", "privacy.unsafe_seeded_randomness=true", "clients=4",
         "data.synthetic_train=16", "partition=iid", "train.batch_size=1", "train.local_steps=40"]  # fmt: skip


@pytest.mark.parametrize(
    "extra", [[], ["privacy.max_physical_batch_size=1"], ["privacy.grad_sample_mode=ghost"]], ids=str
)
def test_a_client_of_four_examples_at_rate_one_quarter_takes_every_step(extra, make_config, monkeypatch) -> None:
    """Four examples at rate 1/4: a batch is empty with probability 0.32, so 40 steps draw some (seeded here).
    Opacus's own empty batch failed (a dict row's structure; a model run on zero rows); now each is a step."""
    empty: list[int] = []
    zero = train.zero_gradients
    monkeypatch.setattr(train, "zero_gradients", lambda opt: (empty.append(1), zero(opt)))
    worker = Worker(make_config(*SMALL, *extra), num_partitions=4)
    state = worker.adapted.initial_state()
    payload, _, result = worker.train_round(0, state, server_round=1, history=[])
    assert len(worker.data.rows(0)) == 4 and result.steps == 40 and empty
    assert any(not torch.equal(v, state[k]) for k, v in payload.items())


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_an_empty_batch_is_a_step_on_a_zero_sum_plus_the_noise(sigma: float) -> None:
    weight = torch.nn.Parameter(torch.ones(3, 2))
    opt = DPOptimizer(torch.optim.SGD([weight], lr=1.0), noise_multiplier=sigma, max_grad_norm=1.0,
                      expected_batch_size=4, generator=torch.Generator().manual_seed(0))  # fmt: skip
    train.zero_gradients(opt)
    opt.step()
    moved = not torch.equal(weight.detach(), torch.ones(3, 2))
    assert moved == (sigma > 0)  # the noise, scaled by the expected batch: the step a non-empty batch would take
