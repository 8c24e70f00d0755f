"""Client-side DP-SGD's mechanisms: Opacus around a round, clipped and noised sums, private randomness.

Each round a client trains DP-SGD (:func:`dp_sgd`): Poisson-sampled batches,
per-sample gradients of the trainable tensors clipped to C = ``max_grad_norm`` in
total and Gaussian noise of std sigma C. Its budget is :mod:`fedlora.privacy.accounting`'s.

Fed-SB's LoRA-SB gradient (round 0) is a release too (``fedlora.learning.gradient_init``): the
examples are a Poisson subsample of the client's data (:func:`poisson_subsample`:
each record in independently, so adding or removing one record changes one term of
the sum), each example's gradient of the base weights is clipped to C and the sum
gets N(0, sigma^2 C^2) noise (:func:`clip_and_noise`): a sampled Gaussian mechanism,
charged as one step at the subsample's rate (the share the server asked for over the
client's examples, at most 1), exactly as a DP-SGD step is.

Randomness. Everything the guarantee rests on (the noise, the Poisson batch masks,
the init subsample) comes from :func:`private_generator`: a torch generator seeded
from 64 bits of operating-system entropy in the client process, fresh for every
release, so that neither the server nor other clients can regenerate it from the run
seed. It is not a cryptographic generator: Opacus's ``secure_mode`` needs
``torchcsprng``, which has no build for torch 2.x, so floating-point attacks on the
Gaussian sampler (Mironov 2012) are out of scope. ``privacy.unsafe_seeded_randomness``
derives the same draws from the run seed instead (:func:`dp_generator`), for tests
and benchmarks that must compare runs; such runs are not private and say so.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from fedlora.config.federated import PrivacyConfig
from fedlora.learning.train import LengthSorted

log = logging.getLogger(__name__)

UNSAFE_WARNING = (
    "privacy.unsafe_seeded_randomness=true: the DP noise and sampling are derived from the run seed, so anyone "
    "who knows the run's config can remove the noise. This run is NOT PRIVATE; use it for tests only."
)


NOT_PRIVATE_COLUMN = "privacy_warning"  # metrics.csv's column on runs with seeded DP randomness
NOT_PRIVATE = "NOT PRIVATE: privacy.unsafe_seeded_randomness"


def private_generator() -> torch.Generator:
    """A generator seeded from 64 bits of OS entropy (``secrets``): nobody else can reproduce its draws.

    The seed is never stored or sent. One per release, so no two releases share a stream.
    """
    return torch.Generator().manual_seed(secrets.randbits(64))


def dp_generator(cfg: PrivacyConfig, seed: int) -> torch.Generator:
    """The generator of one DP release: private, or (``unsafe_seeded_randomness``) seeded by ``seed``.

    ``seed`` is the release's seed derived from the run seed; it is used only when the
    user switched the protection off, and every such use logs :data:`UNSAFE_WARNING`.
    """
    if not cfg.unsafe_seeded_randomness:
        return private_generator()
    log.warning(UNSAFE_WARNING)
    return torch.Generator().manual_seed(seed)


@contextmanager
def dp_sgd(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: torch.utils.data.DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str,
    criterion: nn.Module,
    generator: torch.Generator,
    poisson: bool = True,
    max_physical_batch_size: int | None = None,
    lengths: Sequence[int] | None = None,
) -> Iterator[tuple[nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader, Any]]:
    """Opacus around one round: (private model, DP optimizer, Poisson loader, criterion).

    ``generator`` draws the noise and the Poisson masks (:func:`dp_generator`); the
    loader of ``batches`` gives the dataset, batch size (expected batch under Poisson
    sampling: rate 1 / len(batches)) and collate function. ``poisson=False`` keeps
    ``batches`` as they are: only for tests that need fixed batches, since the
    accounting assumes Poisson sampling (the config refuses it under DP).
    The model is put in train mode first (Opacus finds no activations in eval mode).
    Ghost clipping returns a wrapped criterion whose ``backward`` runs both passes;
    the other modes return ``criterion`` unchanged. Opacus's hooks are removed on
    exit, so the worker's cached model is a plain peft model again.

    With ``max_physical_batch_size``, Opacus's ``BatchMemoryManager`` cuts each logical
    batch into physical batches; given the examples' token ``lengths``, each logical
    batch is first ordered by length (:class:`fedlora.learning.train.LengthSorted`), so that a physical batch
    holds texts of similar lengths and pads little. The logical batch, its clipped sum
    and its noise are unchanged: only the work of padding goes.
    """
    from opacus import PrivacyEngine

    model.train()
    if poisson:  # Opacus draws the Poisson masks from the loader's generator: make it ours
        batches = torch.utils.data.DataLoader(
            batches.dataset, batch_size=batches.batch_size, collate_fn=batches.collate_fn, generator=generator
        )
    with warnings.catch_warnings():
        # Expected, so silenced: Opacus asks transformers a deprecated question; full backward
        # hooks fire on the outputs of modules whose inputs need no grad (the frozen embeddings
        # feed the first LoRA). Opacus's "Secure RNG turned off" warning is left on: it is true.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine()  # its accountant is unused: clients keep their own history
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=batches,
            criterion=criterion,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=poisson,
            grad_sample_mode=grad_sample_mode,
            noise_generator=generator,
        )
        private, dp_optimizer, *rest = made
        private_criterion = rest[0] if len(rest) == 2 else criterion
        # Opacus's sampler, our collate: Opacus's guesses an empty Poisson batch's structure from the first
        # example (a tokenised row's dict: it fails) or batch (a model cannot run on zero rows); ours gives
        # [], which train_steps takes as a step on a zero sum, noised (see zero_gradients)
        sampler = rest[-1].batch_sampler
        if lengths is not None and max_physical_batch_size is not None:
            sampler = LengthSorted(sampler, lengths)
        logical = torch.utils.data.DataLoader(
            rest[-1].dataset, batch_sampler=sampler, collate_fn=partial(collate_or_empty, batches.collate_fn),
            generator=rest[-1].generator,
        )  # fmt: skip
        try:
            if max_physical_batch_size is None:
                yield private, dp_optimizer, logical, private_criterion
            else:
                from opacus.utils.batch_memory_manager import BatchMemoryManager

                with BatchMemoryManager(
                    data_loader=logical, max_physical_batch_size=max_physical_batch_size, optimizer=dp_optimizer
                ) as physical:
                    yield private, dp_optimizer, physical, private_criterion
        finally:
            private._close()


def collate_or_empty(collate: Callable[[list[Any]], Any], rows: list[Any]) -> Any:
    """``collate(rows)``, or ``[]`` for an empty Poisson batch."""
    return collate(rows) if rows else []


def poisson_subsample(num_examples: int, rate: float, *, generator: torch.Generator) -> list[int]:
    """Indices of a Poisson subsample: each of ``num_examples`` records is in with probability ``rate``.

    Each record's inclusion is independent of the others, so adding or removing one
    record changes at most one term of a sum over the subsample (sensitivity C after
    clipping), unlike the first rows of a shuffle, which all move when a record is added.
    """
    return torch.nonzero(torch.rand(num_examples, generator=generator) < rate).flatten().tolist()


def clip_and_noise(
    per_example: Iterator[dict[Any, torch.Tensor]],
    zeros: dict[Any, torch.Tensor],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[dict[Any, torch.Tensor], int]:
    """Sum of per-example gradients, each clipped to ``max_grad_norm`` in total norm, plus N(0, (sigma C)^2) noise.

    ``zeros`` gives every key and shape of the sum (an empty subsample still gets its
    noise). Written out rather than through Opacus because it is a one-off over frozen
    base weights (Fed-SB's init), where one example at a time is simple and obviously right.
    """
    total = {key: z.clone() for key, z in zeros.items()}
    count = 0
    for grads in per_example:  # computes gradients: not under no_grad
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads.values()))
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-12))
        for key, g in grads.items():
            total[key] += factor * g
        count += 1
    for key, value in total.items():
        total[key] = value + gaussian_noise(value, std=noise_multiplier * max_grad_norm, generator=generator)
    return total, count


def gaussian_noise(like: torch.Tensor, *, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise shaped as ``like``, drawn from ``generator``."""
    return std * torch.randn(like.shape, generator=generator, dtype=like.dtype)
