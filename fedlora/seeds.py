"""Named seed streams: every reproducible random draw of a run, derived from the run seed.

Each stream is a seed per (run seed, round, client), hashed so that streams and
tuples are independent. What a DP guarantee rests on never comes from here
(:func:`fedlora.privacy.dp_sgd.dp_generator`), except on the explicitly unsafe switch.

The tags keep the values the streams have always had, so that runs stay
bit-for-bit reproducible across versions.
"""

from __future__ import annotations

import hashlib
import random
from enum import Enum

import torch


class Stream(Enum):
    """A named stream; its value is the tag appended to (seed, round[, client])."""

    LOCAL_BATCHES = ()  # a client's batch order and dropout in a round (and its init subset)
    INITIAL_STATE = (-1,)  # the strategy's initial state, drawn identically in every process
    GRADIENT_INIT_SVD = (-2,)  # the sketch of LoRA-SB's randomised SVD
    CALIBRATION_BATCHES = (-3,)  # the order of a public calibration file (LoRA-SB init)
    CLIENT_START = (-4,)  # what a client draws at the start of a round (FLoRA's fresh adapter)
    UNSAFE_DP = (-5,)  # DP noise and masks, only on privacy.unsafe_seeded_randomness (NOT PRIVATE)
    PERSONAL_TEST = (-6,)  # the test rows a client evaluates on under DP (drawn in its released label mix)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers: independent streams per tuple."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_of(stream: Stream, seed: int, *, server_round: int = 0, client: int | None = None) -> int:
    """The seed of ``stream`` for (run ``seed``, ``server_round``, ``client``)."""
    parts = (seed, server_round) if client is None else (seed, server_round, client)
    return derive_seed(*parts, *stream.value)


def generator(stream: Stream, seed: int, *, server_round: int = 0, client: int | None = None) -> torch.Generator:
    """A torch generator on ``stream`` (see :func:`seed_of`)."""
    return torch.Generator().manual_seed(seed_of(stream, seed, server_round=server_round, client=client))


def client_sampling(seed: int, server_round: int) -> random.Random:
    """The generator that picks a round's clients (a string seed, as ``random.Random`` hashes it)."""
    return random.Random(f"fedlora-sample:{seed}:{server_round}")
