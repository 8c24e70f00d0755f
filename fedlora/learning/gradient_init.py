"""Gradient-based initialisation (Fed-SB's LoRA-SB): base-weight gradients -> the strategy's initial state.

A strategy asks for it with ``Strategy.gradient_init`` (a :class:`strategies.base.GradientInit`).
Before round 1 the gradients of the adapted modules' base weights W0, with the adapter
off, are summed over ``samples`` examples, either by the clients sampled for round 0
(each sends its share once: :func:`client_share`) or by the server on a public
calibration file (:func:`from_calibration`); :func:`initialise` turns the sum into the
state (the strategy's ``initialise``: sign, SVD, factors).

Under DP a client's share is a release: a Poisson subsample of its data drawn with
private randomness (each record in independently, so one record changes one term),
each example's gradient clipped to ``privacy.max_grad_norm``, Gaussian noise added,
charged to its ledger as one sampled-Gaussian step at the subsample's rate (:mod:`fedlora.privacy.dp_sgd`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader

from fedlora import lora
from fedlora.learning.data import load_calibration
from fedlora.learning.train import local_steps
from fedlora.learning.worker import Worker
from fedlora.lora import Tensors
from fedlora.privacy.accounting import Step
from fedlora.privacy.dp_sgd import clip_and_noise, dp_generator, poisson_subsample
from fedlora.seeds import Stream, generator, seed_of

Backward = Callable[[dict[str, torch.Tensor]], int]


def client_share(
    worker: Worker, partition_id: int, *, num_examples: int, history: list[Step] | None = None
) -> tuple[Tensors, int]:
    """A client's summed base-weight gradients over ``num_examples`` of its examples; (gradients, rows used).

    With ``privacy=dp`` the rows are a Poisson subsample of expected size ``num_examples``,
    their gradients are clipped per example and noised, and ``history`` gets the release.
    """
    cfg = worker.cfg
    seed = seed_of(Stream.LOCAL_BATCHES, cfg.seed, client=partition_id)
    data = worker.data.tokenised(partition_id)
    if not cfg.privacy.enabled:
        return base_gradients(worker, data, num_examples=num_examples, seed=seed)
    if history is None:
        raise ValueError("privacy=dp needs the client's accountant history")
    plan = worker.privacy_plan(partition_id)
    g = dp_generator(cfg.privacy, seed_of(Stream.UNSAFE_DP, cfg.seed, client=partition_id))
    rate = min(1.0, num_examples / len(data))
    rows = data.select(poisson_subsample(len(data), rate, generator=g))
    torch.manual_seed(seed)  # dropout, as in training
    batches = DataLoader(rows, batch_size=1, collate_fn=worker.task.collate(worker.data.tokenizer))
    weights = lora.base_weights(worker.adapted.model)
    zeros = expected(worker)
    with _base_gradients(worker) as backward:

        def per_example() -> Iterator[Tensors]:
            for row in batches:
                backward(row)
                yield {k: w.grad.detach().to("cpu", copy=True) for k, w in weights.items()}
                for w in weights.values():
                    w.grad = None

        out = clip_and_noise(
            per_example(),
            zeros,
            max_grad_norm=cfg.privacy.max_grad_norm,
            noise_multiplier=plan.noise_multiplier,
            generator=g,
        )
    history.append(plan.init_step_at(rate))  # a sampled Gaussian mechanism at the subsample's rate
    return out


def from_calibration(worker: Worker, source: str, *, num_examples: int) -> tuple[Tensors, int]:
    """The server's own summed gradients on the public calibration file ``source`` (nothing is released)."""
    return base_gradients(
        worker,
        calibration(worker, source),
        num_examples=num_examples,
        seed=seed_of(Stream.CALIBRATION_BATCHES, worker.cfg.seed),
    )


def expected(worker: Worker) -> Tensors:
    """Zeros shaped as the adapted modules' base weights (``Role.BASE``): what a client's share must look like."""
    return {k: torch.zeros(w.shape, dtype=w.dtype) for k, w in lora.base_weights(worker.adapted.model).items()}


def calibration(worker: Worker, source: str):
    """The calibration file ``source``, in the run's data format, labels mapped by name, tokenised."""
    rows = load_calibration(worker.cfg.data, source, label_names=worker.data.splits.label_names)
    return worker.task.tokenize(
        rows, worker.data.tokenizer, max_len=worker.cfg.train.max_seq_len, labels=worker.data.splits.label_names
    )


def base_gradients(worker: Worker, data, *, num_examples: int, seed: int) -> tuple[Tensors, int]:
    """Summed gradients of the adapted modules' base weights W0 (``Role.BASE``), with the adapter off,
    over the first ``num_examples`` rows of ``data`` in a seeded order (no DP); (gradients, rows used)."""
    with _base_gradients(worker) as backward:
        seen = sum(backward(batch) for batch in take(worker.data.shuffled(data, seed=seed), num_examples))
        weights = lora.base_weights(worker.adapted.model)
        return {k: w.grad.detach().to("cpu", copy=True) for k, w in weights.items()}, seen


def take(batches, num_examples: int):
    """The first ``num_examples`` rows of ``batches``, in batches as they come (the last one cut)."""
    left = num_examples
    for batch in batches:
        if left <= 0:
            return
        n = min(len(batch["labels"]), left)
        yield {k: v[:n] for k, v in batch.items()}
        left -= n


def initialise(worker: Worker, state: Tensors, gradients: Tensors) -> Tensors:
    """The strategy's initial state from summed base-weight gradients (eta_1 from the run's lr and steps)."""
    cfg = worker.cfg
    return worker.strategy.initialise(
        state,
        gradients,
        lr=cfg.train.lr,
        total_steps=cfg.rounds * local_steps(cfg.train, len(worker.data.splits.train) // max(1, cfg.clients)),
        generator=generator(Stream.GRADIENT_INIT_SVD, cfg.seed),
    )


@contextmanager
def _base_gradients(worker: Worker) -> Iterator[Backward]:
    """Within the block: adapter off, base weights take gradients; yields backward(batch) -> rows."""
    model = worker.adapted.model
    weights = lora.base_weights(model)
    model.train()
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None

    def backward(batch: dict[str, torch.Tensor]) -> int:
        batch = {k: v.to(worker.device) for k, v in batch.items()}
        n = len(batch["labels"])
        (worker.task.loss(model, batch) * n).backward()  # mean loss -> sum over examples
        return n

    try:
        with model.disable_adapter():
            yield backward
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
