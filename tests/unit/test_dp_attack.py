"""The server plays attacker: with the run's config and seed it regenerates every draw it can and tries to
strip the noise from a DP client's real reply. It must fail with private randomness, and succeed on the
unsafe seeded switch (so the test can tell).

What it attacks: Fed-SB's LoRA-SB gradient release (round 0) and one DP-SGD round (one SGD step at
lr 1, so the update is the noisy clipped gradient sum over the expected batch size). The truth, the
clipped sum before noise, is recorded inside the client by wrapping the noise functions.
"""

from __future__ import annotations

import math

import opacus.optimizers.optimizer as opacus_optimizer
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora import lora
from fedlora.flower import client_app, records
from fedlora.learning.worker import Worker
from fedlora.privacy import dp_sgd as privacy
from fedlora.seeds import Stream, seed_of

PID = 1
SIGMA = 2.0
DP = ["clients=4", "privacy=dp", f"privacy.noise_multiplier={SIGMA}", "privacy.max_grad_norm=1.0"]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch) -> None:
    """Messages built outside a Flower process need the identity Flower would set."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def reply_of(cfg, config: dict, arrays: RecordDict | None = None) -> Message:
    """A real ClientApp reply of partition PID to a TRAIN message (a fresh node: empty state)."""
    content = RecordDict({records.CONFIG: ConfigRecord(config)})
    if arrays is not None:
        content[records.ARRAYS] = arrays
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={records.PARTITION_ID: PID}, state=RecordDict(), run_config={})
    return client_app.train(msg, context, cfg)


def recovery(guess: dict, truth: dict) -> tuple[float, float]:
    """(share of entries, where the truth is not 0, whose sign the attacker got right;
    ||guess - truth|| / (sigma C sqrt(entries)), the error in units of the noise)."""
    agree = total = 0
    error = 0.0
    for key, value in truth.items():
        nonzero = value != 0
        agree += int((torch.sign(guess[key]) == torch.sign(value))[nonzero].sum())
        total += int(nonzero.sum())
        error += float((guess[key].double() - value.double()).square().sum())
    entries = sum(v.numel() for v in truth.values())
    return agree / total, math.sqrt(error / entries) / SIGMA


def assert_nothing_unprotected(reply: Message) -> None:
    metrics = reply.content[records.METRICS]
    assert records.TRAIN_LOSS not in metrics  # a loss on private batches
    # the example count only as the sum of the noised label counts (test_a_dp_client_sends_only_...)
    assert set(metrics) <= {records.PARTITION_ID, records.EPSILON, records.REFUSED, records.NUM_EXAMPLES}


# -- Fed-SB's init release ---------------------------------------------------------------------
def init_attack(make_config, monkeypatch, *, unsafe: bool) -> tuple[float, float]:
    cfg = make_config("strategy=fed_sb", *DP, f"privacy.unsafe_seeded_randomness={str(unsafe).lower()}")
    noises: list[torch.Tensor] = []
    original = privacy.gaussian_noise
    monkeypatch.setattr(privacy, "gaussian_noise", lambda like, **kw: noises.append(original(like, **kw)) or noises[-1])
    share = 24
    reply = reply_of(
        cfg,
        {records.SERVER_ROUND: 0, records.PHASE: records.PHASE_INIT, records.INIT_EXAMPLES: share,
         records.LABELS: list(Worker(cfg, num_partitions=4).data.splits.label_names)},
    )  # fmt: skip
    assert_nothing_unprotected(reply)
    released = records.from_record(reply.content[records.ARRAYS])
    worker = Worker(cfg, num_partitions=cfg.clients)
    keys = list(lora.base_weights(worker.adapted.model))  # the order the client noises them in
    truth = {k: released[k] - z for k, z in zip(keys, noises, strict=True)}

    # The attacker: the generator an unsafe client would use, advanced past the Poisson mask.
    n = len(worker.data.partitions[PID])
    g = torch.Generator().manual_seed(seed_of(Stream.UNSAFE_DP, cfg.seed, server_round=0, client=PID))
    torch.rand(n, generator=g)
    guess = {k: released[k] - SIGMA * torch.randn(released[k].shape, generator=g) for k in keys}
    return recovery(guess, truth)


def test_the_server_cannot_strip_the_noise_of_fed_sb_s_init_release(make_config, monkeypatch) -> None:
    (private, private_error), (seeded, seeded_error) = (
        init_attack(make_config, monkeypatch, unsafe=unsafe) for unsafe in (False, True)
    )
    print(
        f"init release: sign agreement {private:.3f} private / {seeded:.3f} seeded; "
        f"error {private_error:.3g} / {seeded_error:.3g} noise std"
    )
    assert private < 0.6 and private_error > 1  # as far off as the noise itself
    assert seeded > 0.95 and seeded_error < 1e-5  # recovered up to float rounding


# -- one DP-SGD round ----------------------------------------------------------------------------
def round_attack(make_config, monkeypatch, *, unsafe: bool) -> tuple[float, float]:
    cfg = make_config(
        *DP, "train.optimizer=sgd", "train.lr=1.0", "train.local_steps=1",
        f"privacy.unsafe_seeded_randomness={str(unsafe).lower()}",
    )  # fmt: skip
    sums: list[torch.Tensor] = []
    original = opacus_optimizer._generate_noise

    def recording(std, reference, generator=None, secure_mode=False):
        sums.append(reference.detach().clone())  # the clipped gradient sum, before noise
        return original(std, reference, generator, secure_mode)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", recording)
    worker = Worker(cfg, num_partitions=cfg.clients)
    start = worker.adapted.protocol.download(worker.adapted.initial_state())
    config = {records.SERVER_ROUND: 1, records.FIXED_DIGEST: "", records.LABELS: list(worker.data.splits.label_names)}
    reply = reply_of(cfg, config, records.to_record(start))
    assert_nothing_unprotected(reply)
    payload = records.from_record(reply.content[records.ARRAYS])
    keys = sorted(payload)  # the optimizer's parameter order
    truth = dict(zip(keys, sums, strict=True))

    # What the server sees: SGD at lr 1 moved each tensor by -(sum + noise) / expected batch.
    n = len(worker.data.partitions[PID])
    rate = 1 / math.ceil(n / cfg.train.batch_size)
    expected = int(n * rate)
    observed = {k: -expected * (payload[k] - start[k]) / cfg.train.lr for k in keys}
    # The attacker regenerates the unsafe client's draws: the noise on its label counts (logit adjustment),
    # the loader's base seed, the Poisson mask, the gradient noise.
    g = torch.Generator().manual_seed(seed_of(Stream.UNSAFE_DP, cfg.seed, server_round=1, client=PID))
    torch.normal(0.0, cfg.privacy.label_noise, (len(worker.data.splits.label_names),), generator=g, dtype=torch.float64)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    torch.rand(n, generator=g)
    guess = {k: observed[k] - torch.normal(0, SIGMA, observed[k].shape, generator=g) for k in keys}
    return recovery(guess, truth)


def test_the_server_cannot_strip_the_noise_of_a_dp_sgd_round(make_config, monkeypatch) -> None:
    (private, private_error), (seeded, seeded_error) = (
        round_attack(make_config, monkeypatch, unsafe=unsafe) for unsafe in (False, True)
    )
    print(
        f"DP-SGD round: sign agreement {private:.3f} private / {seeded:.3f} seeded; "
        f"error {private_error:.3g} / {seeded_error:.3g} noise std"
    )
    assert private < 0.6 and private_error > 1  # as far off as the noise itself
    assert seeded > 0.95 and seeded_error < 1e-5  # recovered up to float rounding


def test_a_dp_client_sends_only_its_noised_example_count(make_config) -> None:
    """Weighting by examples under DP: the count a client sends is the sum of its noised label counts (the
    logit adjustment's release, already charged), never the exact one. Seeded here, so the test can redraw it."""
    from fedlora.learning.classification import SequenceClassification

    cfg = make_config(*DP, "train.local_steps=1", "privacy.unsafe_seeded_randomness=true")
    assert cfg.strategy.weighting == "examples"
    worker = Worker(cfg, num_partitions=cfg.clients)
    config = {records.SERVER_ROUND: 1, records.FIXED_DIGEST: "", records.LABELS: list(worker.data.splits.label_names)}
    reply = reply_of(cfg, config, records.to_record(worker.adapted.protocol.download(worker.adapted.initial_state())))
    sent = reply.content[records.METRICS][records.NUM_EXAMPLES]
    g = torch.Generator().manual_seed(seed_of(Stream.UNSAFE_DP, cfg.seed, server_round=1, client=PID))
    labels = worker.data.tokenised(PID)["labels"]
    noised = SequenceClassification.label_counts(labels, 4, noise_std=cfg.privacy.label_noise, generator=g)
    assert sent == max(1, round(float(noised.sum()))) and sent != len(labels)


def test_private_generators_are_not_reproducible() -> None:
    a, b = privacy.private_generator(), privacy.private_generator()
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
