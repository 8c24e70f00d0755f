"""A client round on the tiny model: what trains, what is sent, what stays bit-identical; adapters on disk."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from fedlora.checkpoint import load_checkpoint, save_checkpoint
from fedlora.flower import records
from fedlora.flower.server_app import export_adapter
from fedlora.lora import LORA_ROLES, Role
from fedlora.model import resolve_path
from fedlora.task import TASK
from fedlora.worker import Worker


def base_weights(worker: Worker) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in worker.model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("head", ["train", "freeze"])
def test_only_trainable_tensors_change_and_are_sent(make_config, head: str) -> None:
    worker = Worker(make_config(f"train.head={head}", "train.lr=0.01"), num_partitions=10)
    received = worker.sent_down(worker.initial_adapters())
    before = base_weights(worker)
    payload, num_examples, result = worker.train_round(3, received, server_round=1)

    assert num_examples == len(worker.partitions[3]) and result.steps == 2
    sent_roles = {k.role for k in payload}
    assert sent_roles == ({Role.A, Role.B, Role.DENSE} if head == "train" else {Role.A, Role.B})
    assert all(k in worker.trainable_keys for k in payload)
    # The base model (and a frozen head) is bit-identical after local training.
    after = base_weights(worker)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    if head == "train":
        assert changed and all("modules_to_save" in n for n in changed)
    else:
        assert changed == []
        assert not any(k.role is Role.DENSE for k in worker.sent_down(worker.initial_adapters()))
    # LoRA B starts at zero and moves: the round did train.
    assert any(k.role is Role.B and v.abs().sum() > 0 for k, v in payload.items())


def test_a_client_round_is_reproducible(make_config) -> None:
    cfg = make_config("train.lr=0.01", "lora.dropout=0.1")
    first = Worker(cfg, num_partitions=10)
    second = Worker(cfg, num_partitions=10)
    start = first.initial_adapters()
    assert all(torch.equal(start[k], v) for k, v in second.initial_adapters().items())
    a, _, _ = first.train_round(1, start, server_round=2)
    b, _, _ = second.train_round(1, start, server_round=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, _, _ = second.train_round(1, start, server_round=3)  # another round draws other batches
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_exported_adapter_loads_with_peft_and_gives_the_same_outputs(make_config, tmp_path) -> None:
    cfg = make_config()
    worker = Worker(cfg, num_partitions=10)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in worker.initial_adapters().items()}
    folder = export_adapter(worker, state, tmp_path / "adapter")

    batch = {k: v for k, v in next(iter(worker.test_batches)).items() if k != "labels"}
    worker.model.eval()
    with torch.no_grad():
        expected = worker.model(**batch).logits

    # A fresh base built the documented way (the tiny model is a seeded random init).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        base = TASK.build(
            resolve_path(cfg.model.path),
            num_labels=worker.splits.num_labels,
            pretrained=False,
            architecture=cfg.model.architecture,
        )
    loaded = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected)


def test_checkpoint_and_wire_round_trips_are_bit_exact(make_config, tmp_path) -> None:
    worker = Worker(make_config(), num_partitions=10)
    state = worker.initial_adapters()
    path = save_checkpoint(tmp_path, state, server_round=7)
    loaded, server_round = load_checkpoint(path)
    assert server_round == 7 and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    wire = records.from_record(records.to_record(state))
    assert all(torch.equal(wire[k], v) for k, v in state.items())
    numbers, nbytes = records.size(records.to_record(state))
    assert numbers == sum(v.numel() for v in state.values())
    assert nbytes >= 4 * numbers  # float32 data plus each array's small header


def test_lora_count_matches_the_formula(make_config) -> None:
    cfg = make_config()
    worker = Worker(cfg, num_partitions=10)
    lora_numbers = sum(v.numel() for k, v in worker.initial_adapters().items() if k.role in LORA_ROLES)
    d, r = cfg.model.architecture["hidden_size"], cfg.lora.rank
    layers, targets = cfg.model.architecture["num_hidden_layers"], len(cfg.lora.target_modules)
    assert lora_numbers == layers * targets * (d * r + r * d)


def test_minilm_learns_the_easy_synthetic_task() -> None:
    """Real pretrained MiniLM, two local rounds on one client: accuracy rises far above chance."""
    from fedlora.cli import compose

    cfg, _ = compose(
        [
            "clients=2",
            "clients_per_round=1",
            "data.synthetic_train=400",
            "data.synthetic_test=200",
            "train.local_steps=15",
        ]
    )
    worker = Worker(cfg, num_partitions=2)
    state = worker.initial_adapters()
    before = worker.evaluate(state)["accuracy"]
    for server_round in (1, 2):
        payload, _, _ = worker.train_round(0, state, server_round=server_round)
        state = {**state, **payload}
    after = worker.evaluate(state)["accuracy"]
    assert before < 0.5 and after > 0.8, (before, after)
