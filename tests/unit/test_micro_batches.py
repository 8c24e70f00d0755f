"""train.micro_batch_size: a batch computed in length-ordered micro-batches is the same optimizer step."""

from __future__ import annotations

import math

import torch

from fedlora.learning.train import MicroBatches
from fedlora.learning.worker import Worker


def trained(make_config, *overrides: str) -> tuple[dict, int]:
    cfg = make_config("data.synthetic_train=320", "train.batch_size=16", "train.local_steps=3",
                      "train.optimizer=sgd", "train.lr=0.5", *overrides)  # fmt: skip
    worker = Worker(cfg, num_partitions=10)
    for module in worker.adapted.model.modules():  # dropout draws per forward pass: both runs must see the same
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    start = worker.adapted.protocol.download(worker.adapted.initial_state())
    payload, _, result = worker.train_round(3, start, server_round=1)
    return payload, result.steps


def test_micro_batches_give_the_step_of_the_whole_batch(make_config) -> None:
    whole, steps_whole = trained(make_config)
    micro, steps_micro = trained(make_config, "train.micro_batch_size=5")  # pieces of 5, 5, 5, 1
    assert steps_whole == steps_micro == 3
    moved = math.sqrt(sum(float(v.square().sum()) for v in whole.values()))
    differ = math.sqrt(sum(float((micro[k] - whole[k]).square().sum()) for k in whole))
    assert moved > 0 and differ < 1e-4 * moved  # float32 summation order only


def texts(batch: dict) -> list[tuple[int, ...]]:
    """The unpadded token ids of each example of a collated batch."""
    pairs = zip(batch["input_ids"], batch["attention_mask"], strict=True)
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in pairs]


def test_micro_batches_hold_each_batch_once_in_pieces_ordered_by_length(make_config) -> None:
    worker = Worker(make_config("train.batch_size=16", "train.micro_batch_size=5"), num_partitions=10)
    data = worker.data.tokenised(3)
    micro, plain = worker.data.shuffled(data, seed=1, micro=True), worker.data.shuffled(data, seed=1)
    assert isinstance(micro, MicroBatches)
    for pieces, batch in zip(micro, plain, strict=True):  # the same batches as without micro-batches
        assert [len(p["input_ids"]) for p in pieces][:-1] == [5] * (len(pieces) - 1)
        widths = [p["input_ids"].shape[1] for p in pieces]
        assert widths == sorted(widths)  # shortest first: each piece pads only to its own longest
        assert sorted(t for p in pieces for t in texts(p)) == sorted(texts(batch))
