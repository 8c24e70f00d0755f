"""FedSA-LoRA's personal B and the personalised evaluation of every strategy, through the real apps in-process."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.config.compose import compose
from fedlora.flower import records
from fedlora.flower.personal_eval import read_reply, summarise
from fedlora.learning.data import label_counts, shard_test_split
from fedlora.lora import AdapterKey, Role
from tests.conftest import TINY
from tests.local_grid import LocalGrid, grid_for, run_in_process

RUN = [*TINY, "clients=4", "clients_per_round=2", "rounds=2", "train.lr=0.05"]


class RecordingGrid(LocalGrid):
    """Keeps every reply the server receives."""

    def __init__(self, grid: LocalGrid) -> None:
        self.__dict__.update(grid.__dict__)
        self.received: list[Message] = []

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        self.received += replies
        return replies


def rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_fedsa_lora_b_never_leaves_a_client_and_stays_personal(tmp_path: Path) -> None:
    cfg, _ = compose([*RUN, "strategy=fedsa_lora", f"output_dir={tmp_path}"])
    grid = RecordingGrid(grid_for(cfg))
    run_in_process(cfg, grid)
    sent = [
        AdapterKey.parse(k) for m in grid.received if records.ARRAYS in m.content for k in m.content[records.ARRAYS]
    ]
    assert sent and Role.B not in {k.role for k in sent} and Role.A in {k.role for k in sent}
    # Every trained node keeps its own B in its node state; two nodes' B differ; the server's B is still zero.
    kept = {node: records.from_record(ctx.state[records.PERSONAL])
            for node, ctx in grid.contexts.items() if records.PERSONAL in ctx.state}  # fmt: skip
    assert len(kept) >= 2 and all(k.role is Role.B for b in kept.values() for k in b)
    first, second = list(kept.values())[:2]
    assert any(not torch.equal(first[k], second[k]) for k in first) and all(v.abs().sum() > 0 for v in first.values())
    from safetensors.torch import load_file

    checkpoint = load_file(tmp_path / "checkpoint.safetensors")
    assert all(float(v.abs().sum()) == 0 for k, v in checkpoint.items() if AdapterKey.parse(k).role is Role.B)
    table = rows(tmp_path)
    assert all(r["personal_accuracy"] and r["personal_worst10"] for r in table)
    assert float(table[-1]["personal_worst10"]) <= float(table[-1]["personal_accuracy"])
    # Each node wrote its own model after the last round: the global A and head with its own B.
    from fedlora.outputs.export import load_exported

    global_state = {AdapterKey.parse(k): v for k, v in checkpoint.items()}
    for node, b in kept.items():
        pid = int(grid.contexts[node].node_config[records.PARTITION_ID])
        folder = tmp_path / "personal" / f"partition_{pid}"
        assert f"Client {pid}'s own model" in (folder / "README.md").read_text()
        exported = load_file(folder / "adapter_model.safetensors")
        model = load_exported(folder)  # loads as any export does
        assert model is not None
        for key, value in b.items():  # peft's names: ...lora_B.weight
            name = next(n for n in exported if key.module in n and "lora_B" in n)
            assert torch.equal(exported[name], value), key
        for key, value in global_state.items():
            if key.role is Role.A:
                name = next(n for n in exported if key.module in n and "lora_A" in n)
                assert torch.equal(exported[name], value), key


def test_a_node_sampled_for_the_first_time_starts_from_the_initial_b(make_config) -> None:
    """Clients share a process (and its model) in simulation: client 1 must not start from client 0's B."""
    from fedlora.learning.worker import Worker

    worker = Worker(make_config("strategy=fedsa_lora", "train.lr=0.05"), num_partitions=4)
    state = worker.adapted.initial_state()
    worker.train_round(0, worker.adapted.protocol.download(state), server_round=1)
    b0 = worker.adapted.personal()
    assert all(v.abs().sum() > 0 for v in b0.values())
    start = worker.adapted.protocol.start(1, worker.adapted.protocol.download(state), server_round=2)
    assert all(torch.equal(start[k], state[k]) for k in b0)  # the initial B, not client 0's
    mine = worker.adapted.protocol.start(0, worker.adapted.protocol.download(state), server_round=2, personal=b0)
    assert all(torch.equal(mine[k], b0[k]) for k in b0)


def test_personalised_evaluation_is_in_every_strategys_metrics(tmp_path: Path) -> None:
    cfg, _ = compose([*RUN, "strategy=fed_sb", f"output_dir={tmp_path / 'plain'}"])
    run_in_process(cfg)
    table = rows(tmp_path / "plain")
    assert all(0 <= float(r["personal_worst10"]) <= float(r["personal_accuracy"]) <= 1 for r in table)


class SendingGrid(RecordingGrid):
    """Also keeps every message the server sends."""

    def __init__(self, grid: LocalGrid) -> None:
        super().__init__(grid)
        self.sent: list[Message] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent += messages
        return super().push_messages(messages)


def test_under_dp_a_client_evaluates_only_on_rows_drawn_in_the_counts_it_released(tmp_path: Path) -> None:
    from fedlora.flower.client_app import released_mix
    from fedlora.learning.worker import get_worker

    dp = [*RUN, "strategy=fedsa_lora", "privacy=dp", "privacy.noise_multiplier=1"]
    cfg, _ = compose([*dp, f"output_dir={tmp_path / 'dp'}"])
    grid = SendingGrid(grid_for(cfg))
    run_in_process(cfg, grid)
    table = rows(tmp_path / "dp")
    assert table[0]["personal_accuracy"] == ""  # round 0: no node has released anything yet
    assert all(0 <= float(r["personal_worst10"]) <= float(r["personal_accuracy"]) <= 1 for r in table[1:])
    # Only nodes that trained (and so released noised label counts) were asked, and each evaluated the
    # draw in the mix of what it released: its exact label counts chose none of its rows.
    trained = {m.metadata.src_node_id for m in grid.received if m.metadata.message_type == "train"
               and records.ARRAYS in m.content}  # fmt: skip
    evaluations = [m for m in grid.received if m.metadata.message_type == "evaluate"]
    assert evaluations and {m.metadata.src_node_id for m in evaluations} <= trained
    worker = get_worker(cfg, num_partitions=cfg.clients)
    latest = {m.metadata.src_node_id: m for m in evaluations}  # each node's last: its state's mix is that one's
    for m in latest.values():
        context = grid.contexts[m.metadata.src_node_id]
        pid, mix = int(context.node_config[records.PARTITION_ID]), released_mix(context)
        exact = np.bincount(worker.data.tokenised(pid)["labels"], minlength=4)
        assert mix is not None and not np.allclose(mix, exact * context.state[records.RELEASED_COUNTS]["rounds"])
        drawn = worker.data.released_test_shard(pid, mix)
        share = round(len(worker.data.splits.test) / cfg.clients)  # fewer where a label has too few test rows
        assert m.content[records.METRICS][records.PERSONAL_EXAMPLES] == len(drawn) <= share
        assert len(drawn) > 0 or sum(mix) == 0  # 50 examples, noise 50: every released count can floor at 0
    # A node that released nothing (a server asking one that never trained) answers no statistic.
    asked = next(m for m in grid.sent if m.metadata.message_type == "evaluate")
    node = asked.metadata.dst_node_id
    fresh = Context(1, node, node_config=dict(grid.contexts[node].node_config), state=RecordDict(), run_config={})
    reply = grid.apps[node](asked, fresh)
    assert reply.content[records.METRICS][records.PERSONAL_EXAMPLES] == 0
    assert read_reply(reply, int(fresh.node_config[records.PARTITION_ID]), reply.content[records.METRICS][
        records.ROUND_NONCE]) == "an empty test shard"  # fmt: skip
    # Fed-SB's DP init round releases its clients' gradients but no label counts: its nodes are not asked.
    cfg, _ = compose([*dp, "strategy=fed_sb", f"output_dir={tmp_path / 'fed_sb'}"])
    run_in_process(cfg, grid := RecordingGrid(grid_for(cfg)))
    evaluations = [m for m in grid.received if m.metadata.message_type == "evaluate"]
    latest = {m.metadata.src_node_id: m for m in evaluations}  # each node's last: drawn in its final mix
    mixes = {node: released_mix(grid.contexts[node]) for node in latest}
    assert evaluations and all(mix is not None for mix in mixes.values())  # every node asked had released counts
    assert all(m.content[records.METRICS][records.PERSONAL_EXAMPLES] > 0 or sum(mixes[node]) == 0
               for node, m in latest.items())  # fmt: skip
    # Without released counts (no logit adjustment) or at user level there is nothing to draw from: off.
    for extra in (["train.logit_adjustment=0"], ["privacy=user", "privacy.noise_multiplier=1"]):
        base = [*RUN, "strategy=fedsa_lora", *extra] if "privacy=user" in extra else [*dp, *extra]
        out = tmp_path / extra[0].replace("=", "_")
        run_in_process(compose([*base, f"output_dir={out}"])[0])
        assert "personal_accuracy" not in rows(out)[0], extra


def test_test_shards_follow_each_clients_label_mix_and_are_disjoint() -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 4, size=400).tolist()
    parts = [[i for i in range(400) if train[i] in (0, 1)], [i for i in range(400) if train[i] == 2 and i % 2],
             [i for i in range(400) if train[i] == 2 and not i % 2]]  # fmt: skip
    test = rng.integers(0, 4, size=101).tolist()
    counts = label_counts(train, parts, 4)
    shards = shard_test_split(counts, test, seed=3)
    flat = [i for shard in shards for i in shard]
    assert len(flat) == len(set(flat))  # disjoint
    assert {test[i] for i in shards[0]} == {0, 1} and {test[i] for i in shards[1] + shards[2]} == {2}
    assert sorted(flat) == [i for i, y in enumerate(test) if y != 3]  # label 3: no client trained on it
    for label in (0, 1, 2):
        dealt = [sum(test[i] == label for i in shard) for shard in shards]
        exact = counts[:, label] / counts[:, label].sum() * sum(dealt)
        assert np.all(np.abs(np.array(dealt) - exact) < 1)  # within one example of the proportion
    assert shard_test_split(counts, test, seed=3) == shards


def test_worst_tenth_and_malformed_evaluation_replies() -> None:
    assert summarise([0.9, 0.5, 0.7]) == pytest.approx({"personal_accuracy": 0.7, "personal_worst10": 0.5})
    many = summarise([i / 20 for i in range(20)])
    assert many["personal_worst10"] == pytest.approx((0 + 0.05) / 2)
    assert summarise([]) == {}

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp process has

    def reply(**metrics) -> Message:
        base = {records.PARTITION_ID: 2, records.ROUND_NONCE: 7, records.PERSONAL_ACCURACY: 0.5,
                records.PERSONAL_EXAMPLES: 10}  # fmt: skip
        m = Message(
            RecordDict({records.METRICS: MetricRecord({**base, **metrics})}), dst_node_id=1, message_type="evaluate"
        )
        return m

    assert read_reply(reply(), 2, 7) == 0.5
    assert "another partition" in read_reply(reply(), 3, 7)
    assert "another partition" in read_reply(reply(), 2, 8)
    assert "accuracy 1.5" in read_reply(reply(**{records.PERSONAL_ACCURACY: 1.5}), 2, 7)
    assert "empty" in read_reply(reply(**{records.PERSONAL_EXAMPLES: 0}), 2, 7)
    assert "unexpected" in read_reply(reply(**{"train-loss": 0.1}), 2, 7)


def test_a_test_shard_drawn_for_one_client_follows_its_mix() -> None:
    from fedlora.learning.data import draw_test_shard

    rng = np.random.default_rng(1)
    test = rng.integers(0, 3, size=300).tolist()  # about 100 rows a label
    drawn = draw_test_shard([30.0, 60.0, -5.0], test, size=60, seed=7)  # a noised count below 0 counts as 0
    assert len(drawn) == len(set(drawn)) == 60
    assert [sum(test[i] == label for i in drawn) for label in range(3)] == [20, 40, 0]
    assert draw_test_shard([30.0, 60.0, -5.0], test, size=60, seed=7) == drawn
    assert draw_test_shard([30.0, 60.0, -5.0], test, size=60, seed=8) != drawn
    few = draw_test_shard([0.0, 1.0, 0.0], test, size=250, seed=7)  # more than label 1 has: all of its rows
    assert few == [i for i, y in enumerate(test) if y == 1]
    assert draw_test_shard([0.0, 0.0, 0.0], test, size=60, seed=7) == []
