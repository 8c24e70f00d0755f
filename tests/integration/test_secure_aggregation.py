"""Secure aggregation (server.secure_aggregation=secaggplus): what the server receives, and what it computes.

Each test runs the real ServerApp and ClientApps in-process (tests.local_grid), once in the clear and
once under Flower's SecAgg+, with the same seed: the clients train identically, so the two runs' global
adapters differ only by SecAgg+'s quantisation, whose bound (fedlora.flower.secure) is checked.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from safetensors.torch import load_file

from fedlora.config.compose import compose
from fedlora.flower import records
from fedlora.flower.secure_client import LOSS_SCALE
from tests.local_grid import LocalGrid, grid_for, run_in_process

pytestmark = pytest.mark.slow

RUN = [
    "model=tiny",
    "data.synthetic_train=300",
    "data.synthetic_test=64",
    "clients=4",
    "clients_per_round=4",
    "rounds=1",
    "train.local_steps=2",
    "train.batch_size=8",
    "simulation.parallel_clients=1",  # one Ray worker (tests/conftest.py TINY says why)
]
SECURE = ["server.secure_aggregation=secaggplus"]
# Flower's quantiser at the defaults: a step of 2 x 8 / 2^22 per weighted value; the mean of the clients'
# rounded values is off by less than one step (equal weights; the tiny run's partitions are near equal)
STEP = 2 * 8.0 / 2**22


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def run(overrides: list[str], out: Path, grid: LocalGrid | None = None) -> Path:
    cfg = compose([*overrides, f"output_dir={out}"])[0]
    return run_in_process(cfg, grid or grid_for(cfg))


class Recording(LocalGrid):
    """A LocalGrid that keeps every reply its nodes send, as the server receives it."""

    def __init__(self, base: LocalGrid) -> None:
        self.__dict__.update(base.__dict__)
        self.replies: list[Message] = []

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        self.replies += [self._replies[i] for i in ids]
        return ids


def masked_vectors(reply: Message) -> list[np.ndarray]:
    return [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]


def test_the_server_receives_only_masked_vectors_whose_sum_is_the_plain_runs_mean(tmp_path: Path) -> None:
    plain_cfg = compose([*RUN, f"output_dir={tmp_path / 'plain'}"])[0]
    plain_grid = Recording(grid_for(plain_cfg))
    run_in_process(plain_cfg, plain_grid)
    secure_cfg = compose([*RUN, *SECURE, f"output_dir={tmp_path / 'secure'}"])[0]
    secure_grid = Recording(grid_for(secure_cfg))
    run_in_process(secure_cfg, secure_grid)

    # In the clear, each client's reply holds its adapter: the server reads every update.
    start = adapter(tmp_path / "plain")  # not the start: only its keys and shapes matter below
    sent = {int(m.content[records.METRICS][records.PARTITION_ID]): records.from_record(m.content[records.ARRAYS])
            for m in plain_grid.replies if m.metadata.message_type == "train"}  # fmt: skip
    assert len(sent) == 4

    # Under SecAgg+, no reply carries a float array, an example count or a loss: only keys, encrypted
    # shares, and at the masked-vector stage integers modulo 2^32 that look uniform and do not follow the update.
    stages: dict[str, int] = {}
    assert not any(records.ARRAYS in reply.content for reply in secure_grid.replies)  # of any kind
    for reply in secure_grid.replies:
        if reply.metadata.message_type != "train":  # partition queries, personalised evaluations
            continue
        assert not reply.has_error()
        stage_record = reply.content.config_records[RECORD_KEY_CONFIGS]
        assert all(len(r) == 0 for r in reply.content.array_records.values())  # Flower's FitRes emptied
        metrics = reply.content.get(records.METRICS)
        assert metrics is None or not {records.NUM_EXAMPLES, records.TRAIN_LOSS} & set(metrics.keys())
        if Key.MASKED_PARAMETERS not in stage_record:
            stages["other"] = stages.get("other", 0) + 1
            continue
        stages[Stage.COLLECT_MASKED_VECTORS] = stages.get(Stage.COLLECT_MASKED_VECTORS, 0) + 1
        assert reply.content["fitres.num_examples"]["num_examples"] == 0  # its weight is only in the mask
        pid = int(metrics[records.PARTITION_ID])
        vector = np.concatenate([v.ravel() for v in masked_vectors(reply)[1:-1]]).astype(np.float64) / 2**32
        update = torch.cat([sent[pid][k].double().ravel() for k in sorted(sent[pid])]).numpy()
        assert vector.size == update.size == sum(t.numel() for t in start.values())
        five_sigma = 5 / vector.size**0.5  # 5 standard errors of a mean (x 0.29) or of a zero correlation
        assert abs(vector.mean() - 0.5) < 0.29 * five_sigma and abs(vector.std() - 0.29) < 0.01  # uniform on [0, 1)
        assert abs(np.corrcoef(vector, update)[0, 1]) < five_sigma
    assert stages == {Stage.COLLECT_MASKED_VECTORS: 4, "other": 12}  # 4 clients x (setup, share keys, unmask)

    # What the server unmasked is the plain run's weighted mean, to the quantisation bound.
    plain, masked = adapter(tmp_path / "plain"), adapter(tmp_path / "secure")
    error = max(float((plain[k] - masked[k]).abs().max()) for k in plain)
    assert 0 < error < STEP, error
    (p,), (s,) = rows(tmp_path / "plain")[1:], rows(tmp_path / "secure")[1:]
    assert abs(float(p["train_loss"]) - float(s["train_loss"])) < STEP * LOSS_SCALE
    # the masked vector is int64 (twice a float32 adapter); public keys and encrypted shares come on top
    assert 2 * int(p["bytes_up"]) < int(s["bytes_up"]) < 3 * int(p["bytes_up"])
    assert int(p["bytes_down"]) < int(s["bytes_down"])


class Faulty(LocalGrid):
    """Node ``victim`` fails (raises: a SuperNode gone) or corrupts (``corrupt(reply)``) its reply at one stage."""

    def __init__(self, base: LocalGrid, victim: int, stage: str, corrupt=None) -> None:
        self.__dict__.update(base.__dict__)
        app = self.apps[victim]

        def faulty(msg, context):
            config = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if config is None or config.get(Key.STAGE) != stage:
                return app(msg, context)
            if corrupt is None:
                raise ConnectionError("node lost")
            reply = app(msg, context)
            corrupt(reply.content.config_records[RECORD_KEY_CONFIGS], reply)
            return reply

        self.apps = {**self.apps, victim: faulty}


def fails_training(base: LocalGrid, victim: int) -> LocalGrid:
    app = base.apps[victim]

    def failing(msg, context):
        if msg.metadata.message_type == "train":
            raise ConnectionError("node lost")
        return app(msg, context)

    base.apps = {**base.apps, victim: failing}
    return base


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """The plain run with all 4 clients, and without client 4 (its training fails)."""
    out = {"with": tmp_path_factory.mktemp("with"), "without": tmp_path_factory.mktemp("without")}
    run(RUN, out["with"])
    cfg = compose([*RUN, f"output_dir={out['without']}"])[0]
    run_in_process(cfg, fails_training(grid_for(cfg), victim=4))
    return out


def truncate(config, reply) -> None:
    config[Key.MASKED_PARAMETERS] = config[Key.MASKED_PARAMETERS][:-1]


def in_the_clear(config, reply) -> None:
    reply.content[records.ARRAYS] = ArrayRecord({"x": Array(np.zeros(3, dtype=np.float32))})


@pytest.mark.parametrize(
    ("stage", "corrupt", "reference"),
    [
        (Stage.COLLECT_MASKED_VECTORS, None, "without"),  # lost before its masked vector: the 3 survivors' sum
        (Stage.UNMASK, None, "with"),  # lost after it: its own mask seed is rebuilt from the others' shares
        (Stage.SETUP, lambda c, r: c.pop(Key.PUBLIC_KEY_2), "without"),
        (Stage.SHARE_KEYS, lambda c, r: c.__setitem__(Key.DESTINATION_LIST, [1]), "without"),
        (Stage.COLLECT_MASKED_VECTORS, truncate, "without"),
        (Stage.COLLECT_MASKED_VECTORS, in_the_clear, "without"),
        (Stage.UNMASK, lambda c, r: c.__setitem__(Key.NODE_ID_LIST, [999] * len(c[Key.NODE_ID_LIST])), "with"),
    ],
    ids=[
        "lost-before-masked",
        "lost-at-unmask",
        "bad-keys",
        "bad-shares",
        "short-vector",
        "update-in-clear",
        "bad-unmask",
    ],
)
def test_a_client_lost_or_malformed_at_any_stage_leaves_the_survivors_sum(stage, corrupt, reference, references,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    """n = 4, threshold t = round(0.67 x 4) = 3: one client lost or dropped for a malformed reply is
    tolerated at every stage. Gone before its masked vector, the others' pairwise masks with it are rebuilt
    from its key's shares and the sum is the 3 survivors' (the plain run without it); gone after it, its
    own mask seed is rebuilt and its update counts (the plain run with it)."""
    cfg = compose([*RUN, *SECURE, f"output_dir={tmp_path}"])[0]
    run_in_process(cfg, Faulty(grid_for(cfg), victim=4, stage=stage, corrupt=corrupt))
    want, got = adapter(references[reference]), adapter(tmp_path)
    assert max(float((want[k] - got[k]).abs().max()) for k in want) < STEP
    assert rows(tmp_path)[1]["replies_received"] == ("3" if reference == "without" else "4")


def test_too_many_dropouts_leave_the_round_unchanged_and_the_run_goes_on(tmp_path: Path) -> None:
    cfg = compose([*RUN, *SECURE, "rounds=2", f"output_dir={tmp_path / 'out'}"])[0]
    grid = Faulty(Faulty(grid_for(cfg), victim=3, stage=Stage.SHARE_KEYS), victim=4, stage=Stage.SHARE_KEYS)
    run_in_process(cfg, grid)
    log = (tmp_path / "out" / "server.log").read_text()
    assert "secure aggregation did not complete" in log
    assert len(rows(tmp_path / "out")) == 3


def test_user_level_dp_over_a_secure_sum_charges_the_same_epsilon_and_releases_the_same_model(tmp_path) -> None:
    """privacy=user with secure aggregation: the clients clip (the server cannot), the server noises the
    unmasked sum. With the same (unsafe, seeded) randomness the cohort, the noise and the accountant are the
    plain run's, so the released adapter and every privacy column agree, to the quantisation error.

    SGD, not AdamW: SecAgg+ rounds stochastically (numpy's global generator, not ours), and AdamW's
    normalisation would turn round 1's sub-step differences into lr-sized steps in round 2 (seen: 4.5-28 steps)."""
    dp = ["privacy=user", "privacy.noise_multiplier=0.5", "privacy.unsafe_seeded_randomness=true", "rounds=2",
          "clients=8", "clients_per_round=4", "privacy.clip_norm=0.05", "train.optimizer=sgd"]  # fmt: skip
    run([*RUN, *dp], tmp_path / "plain")
    run([*RUN, *dp, *SECURE], tmp_path / "secure")
    plain, masked = rows(tmp_path / "plain"), rows(tmp_path / "secure")
    assert len(plain) == len(masked) == 3
    for p, s in zip(plain[1:], masked[1:], strict=True):
        assert p["epsilon"] and p["epsilon"] == s["epsilon"]
        assert p["clip_norm"] == s["clip_norm"] and p["clip_fraction"] == s["clip_fraction"]  # the bits' sum too
        assert p["replies_received"] == s["replies_received"] == ""  # no counts released either way
    a, b = adapter(tmp_path / "plain"), adapter(tmp_path / "secure")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2 * STEP  # under a step a round (seen: 0.8-1.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=flora"], "flora stacks every client's own factors"),
        (["strategy=fedex"], "fedex folds the residual"),
        (["strategy=lora_fair"], "lora_fair's correction"),
        (["server.aggregation=median"], "server.aggregation=median is refused with"),
        (["server.multi_krum=0.2"], "server.multi_krum=0.2 is refused with"),
        (["server.max_update_norm=1.0"], "server.max_update_norm=1.0 is refused with"),
        (["strategy=fed_sb"], "needs strategy.init_source=<a public calibration file>"),
        (["server.secure_aggregation=secagg"], "unknown server.secure_aggregation 'secagg'"),
        (["server.secagg_num_shares=2"], "server.secagg_num_shares must be"),
    ],
)
def test_what_secure_aggregation_cannot_serve_exits_2_with_one_line(overrides, message, capsys) -> None:
    from fedlora.cli import main

    assert main(["simulate", "--dry-run", *RUN, *SECURE, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err
