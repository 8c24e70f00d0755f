"""Base weights that change (FLoRA, FedEx): catch-up of nodes that skipped rounds, merging, export."""

from __future__ import annotations

import pytest
import torch

from fedlora import lora
from fedlora.federation.folding import FoldLog, FoldUpdate, StaleBase, catch_up, numbers
from fedlora.learning.classification import SequenceClassification
from fedlora.learning.model import resolve_path
from fedlora.learning.worker import Worker
from fedlora.lora import AdapterKey, Role
from fedlora.outputs.export import export_adapter, load_exported

TASK = SequenceClassification()

S = 2.0


def round_factors(seed: int, rank: int = 2, d_out: int = 6, d_in: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        AdapterKey("m", Role.A): torch.randn(rank, d_in, generator=g),
        AdapterKey("m", Role.B): torch.randn(d_out, rank, generator=g),
    }


class Node:
    """What a node keeps: D and its version."""

    def __init__(self) -> None:
        self.delta: dict = {}
        self.version = 0

    def receive(self, update: FoldUpdate) -> None:
        self.delta = catch_up(self.delta, self.version, update, scaling=S)
        self.version = update.end


def test_a_node_that_skipped_rounds_holds_the_same_delta_bit_for_bit() -> None:
    log = FoldLog(scaling=S)
    always, sometimes, late = Node(), Node(), Node()
    for rnd in range(1, 7):
        always.receive(log.update_for(always.version))
        if rnd in (1, 5):
            sometimes.receive(log.update_for(sometimes.version))
        log.append(round_factors(rnd))
    for node in (always, sometimes, late):
        node.receive(log.update_for(node.version))
        assert node.version == log.version == 6
        assert torch.equal(node.delta[AdapterKey("m", Role.BASE)], log.delta[AdapterKey("m", Role.BASE)])
    # and equal, up to rounding, to the sum of the rounds' products
    total = sum(S * f[AdapterKey("m", Role.B)] @ f[AdapterKey("m", Role.A)] for f in map(round_factors, range(1, 7)))
    torch.testing.assert_close(log.delta[AdapterKey("m", Role.BASE)], total)


def test_catch_up_sends_the_smaller_of_missed_factors_and_the_dense_delta() -> None:
    log = FoldLog(scaling=S)  # one round: 2 * (6 + 5) = 22 numbers; D: 30
    log.append(round_factors(1))
    update = log.update_for(0)
    assert update.dense is None and update.numbers == 22
    log.append(round_factors(2))  # two rounds: 44 > 30, so a node at version 0 gets D ...
    assert log.update_for(0).dense is not None and log.update_for(0).numbers == 30
    assert log.update_for(1).numbers == 22  # ... and one at version 1 the last round's factors
    assert log.update_for(2) == FoldUpdate(2, 2)  # up to date: nothing
    assert log.update_for(None).dense is not None  # unknown (a failure): D
    assert log.first == 1 and log.all_factors() is None  # round 1's factors can no longer be sent


def test_a_node_at_another_version_than_the_update_refuses_it() -> None:
    log = FoldLog(scaling=S)
    log.append(round_factors(1))
    log.append(round_factors(2, rank=1))
    with pytest.raises(StaleBase, match="version 0, the update starts at 1"):
        catch_up({}, 0, log.update_for(1), scaling=S)


# -- on the tiny model ---------------------------------------------------------------------
def effective_weights(worker: Worker) -> dict[str, torch.Tensor]:
    return {k.module: w.detach().clone() for k, w in lora.base_weights(worker.adapted.model).items()}


def logits(worker: Worker) -> torch.Tensor:
    batch = {k: v for k, v in next(iter(worker.data.test_batches)).items() if k != "labels"}
    worker.adapted.model.eval()
    with torch.no_grad():
        return worker.adapted.model(**batch).logits


def test_a_flora_client_that_skipped_rounds_trains_on_the_same_weights(make_config) -> None:
    """Three rounds of real training; partition 1 takes part in all, partition 4 only in round 3."""
    worker = Worker(make_config("strategy=flora", "train.lr=0.01"), num_partitions=6)
    fl, state = worker.strategy, worker.adapted.initial_state()
    log, nodes = FoldLog(scaling=fl.scaling), {1: Node(), 4: Node(), 5: Node()}
    sampled = {1: [1, 5], 2: [1, 5], 3: [1, 4]}
    seen, server = {}, {}
    for rnd, pids in sampled.items():
        server[rnd] = dict(log.delta)
        payloads, n = [], []
        for pid in pids:
            nodes[pid].receive(log.update_for(nodes[pid].version))
            payload, num, _ = worker.train_round(pid, fl.broadcast(state), server_round=rnd, base=nodes[pid].delta)
            seen[(rnd, pid)] = effective_weights(worker)  # set by train_round from the node's D
            payloads.append(payload)
            n.append(num)
        p = fl.weights(n)
        state = fl.aggregate(state, payloads, p)
        log.append(fl.fold(state, payloads, p))
    skipped, always = seen[(3, 4)], seen[(3, 1)]
    assert all(torch.equal(skipped[m], always[m]) for m in always)
    assert any(not torch.equal(always[m], seen[(1, 1)][m]) for m in always)  # the base did move
    worker.adapted.set_base(server[3])  # the server's copy, for evaluation
    assert all(torch.equal(w, always[m]) for m, w in effective_weights(worker).items())


def test_merging_and_a_fresh_adapter_give_the_model_with_the_adapter(make_config) -> None:
    worker = Worker(make_config("strategy=flora"), num_partitions=4)
    fl = worker.strategy
    g = torch.Generator().manual_seed(1)
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in worker.adapted.initial_state().items()}
    worker.adapted.load(trained)
    with_adapter = logits(worker)
    payload = {k: v for k, v in trained.items() if k.role in (Role.A, Role.B)}
    worker.adapted.set_base(lora.fold({}, fl.fold({}, [payload], fl.weights([1])), scaling=fl.scaling))
    worker.adapted.load(fl.start({k: v for k, v in trained.items() if k.role is Role.DENSE}, like=trained, generator=g))
    assert all(not v.any() for k, v in lora.read(worker.adapted.params).items() if k.role is Role.B)
    torch.testing.assert_close(logits(worker), with_adapter, rtol=1e-5, atol=1e-5)


def test_a_lower_rank_client_trains_and_sends_only_its_rank(make_config) -> None:
    worker = Worker(make_config("strategy=flora", "strategy.client_ranks=[2,8]", "train.lr=0.05"), num_partitions=4)
    assert (
        worker.cfg.model_rank == 8
        and worker.adapted.protocol.rank_mask(0).rank == 2
        and worker.adapted.protocol.rank_mask(1).rank == 8
    )
    payload, _, _ = worker.train_round(0, {}, server_round=1, base={})
    for key, value in payload.items():
        if key.role is Role.A:
            assert value.shape[0] == 2 and value.abs().sum() > 0
        elif key.role is Role.B:
            assert value.shape[1] == 2 and value.abs().sum() > 0
    params = lora.read(worker.adapted.params)  # beyond rank 2 nothing moved from zero
    assert all(not v[2:].any() for k, v in params.items() if k.role is Role.A)
    assert all(not v[:, 2:].any() for k, v in params.items() if k.role is Role.B)
    full, _, _ = worker.train_round(1, {}, server_round=1, base={})
    assert next(v for k, v in full.items() if k.role is Role.A).shape[0] == 8


def fresh_base(worker: Worker):
    cfg = worker.cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return TASK.build(
            resolve_path(cfg.model.path),
            labels=worker.data.splits.label_names,
            pretrained=False,
            architecture=cfg.model.architecture,
        )


@pytest.mark.parametrize(("rounds", "form"), [(1, "lora"), (4, "merged")])
def test_folded_export_loads_and_gives_the_global_model(make_config, tmp_path, rounds: int, form: str) -> None:
    """FedEx: the summed-rank LoRA while it is smaller than the dense update, then merged weights."""
    worker = Worker(make_config("strategy=fedex", "lora.rank=2", "model.pooling=cls"), num_partitions=4)  # fresh_base
    fl, state = worker.strategy, worker.adapted.initial_state()
    log = FoldLog(scaling=fl.scaling)
    g = torch.Generator().manual_seed(2)
    for _ in range(rounds):
        payloads = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()} for _ in range(2)]
        p = fl.weights([1, 2])
        state = fl.aggregate(state, payloads, p)
        log.append(fl.fold(state, payloads, p))
    folder = export_adapter(worker, state, tmp_path / "adapter", fold_log=log)
    expected = logits(worker)  # the worker holds the global model after export
    assert (folder / "adapter_config.json").is_file() == (form == "lora")
    model = load_exported(folder, base=fresh_base(worker) if form == "lora" else None)
    model.eval()
    batch = {k: v for k, v in next(iter(worker.data.test_batches)).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-4, atol=1e-4)
    dense = numbers(log.delta)
    stacked_rank = (2 + 1) * worker.cfg.lora.rank * rounds + worker.cfg.lora.rank
    assert (stacked_rank * (32 + 32) * len(log.delta) < dense) == (form == "lora")
