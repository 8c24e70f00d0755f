"""model.pooling=mean: the head reads the masked mean of the token states, padding changes nothing, exports keep it."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.cli import main
from fedlora.learning.worker import Worker
from fedlora.outputs.export import export_adapter, load_exported


def logits_and_states(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        encoder = model.get_base_model().bert
        states = encoder(**inputs).last_hidden_state
        return model(**inputs).logits, states


def test_the_head_reads_the_mean_of_the_unpadded_token_states(make_config) -> None:
    worker = Worker(make_config("model.pooling=mean"), num_partitions=10)
    batch = next(iter(worker.data.test_batches))
    mask = batch["attention_mask"]
    assert (mask == 0).any(), "the test batch must hold padding for this test to mean anything"
    logits, states = logits_and_states(worker.adapted.model, batch)
    weights = mask.unsqueeze(-1).float()
    mean = (states * weights).sum(1) / weights.sum(1)
    head = worker.adapted.model.get_base_model().classifier
    torch.testing.assert_close(logits, head(mean))
    # The shortest text alone (no padding) gets the logits it got inside the padded batch.
    short = int(mask.sum(1).argmin())
    length = int(mask[short].sum())
    alone = {key: batch[key][short : short + 1, :length] for key in ("input_ids", "attention_mask")}
    alone_logits, _ = logits_and_states(worker.adapted.model, alone)
    torch.testing.assert_close(alone_logits[0], logits[short], rtol=1e-5, atol=1e-6)
    cls_logits, _ = logits_and_states(Worker(make_config("model.pooling=cls"), num_partitions=10).adapted.model, batch)
    assert not torch.allclose(cls_logits, logits)  # the [CLS] pooler is really gone


def test_a_mean_pooled_export_reloads_mean_pooled_and_says_how_to_load_it(make_config, tmp_path) -> None:
    worker = Worker(make_config("model.pooling=mean"), num_partitions=10)
    state = {k: v + 0.05 for k, v in worker.adapted.initial_state().items()}
    folder = export_adapter(worker, state, tmp_path / "adapter")
    batch = next(iter(worker.data.test_batches))
    expected, _ = logits_and_states(worker.adapted.model, batch)
    torch.testing.assert_close(logits_and_states(load_exported(folder), batch)[0], expected)
    assert json.loads((folder / "fedlora.json").read_text())["model"]["pooling"] == "mean"
    card = (folder / "README.md").read_text()
    assert "model.pooling=mean" in card and "AutoPeftModel" not in card


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.pooling=max"], "model.pooling='max': expected cls or mean"),
        (["model=tiny_llama", "task=causal_lm", "model.pooling=mean"], "task=causal_lm has no pooling"),
    ],
)
def test_bad_pooling_exits_2_with_one_line(capsys, overrides, message) -> None:
    code = main(["simulate", "--dry-run", "model=tiny", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_evaluation_sorted_by_length_equals_one_text_at_a_time(make_config, pooling: str) -> None:
    """The test split is batched by length (less padding): accuracy and loss equal those of unpadded texts."""
    worker = Worker(make_config(f"model.pooling={pooling}", "train.eval_batch_size=8"), num_partitions=10)
    task, model, data = worker.task, worker.adapted.model, worker.data
    lengths = [int(b["attention_mask"].sum(1).max()) for b in data.test_batches]
    assert lengths == sorted(lengths) and len(set(lengths)) > 1
    tokenized = task.tokenize(data.splits.test, data.tokenizer, max_len=worker.cfg.train.max_seq_len)
    alone = torch.utils.data.DataLoader(tokenized, batch_size=1, collate_fn=task.collate(data.tokenizer))
    sorted_batches = task.evaluate(model, data.test_batches, torch.device("cpu"))
    one_by_one = task.evaluate(model, alone, torch.device("cpu"))
    assert sorted_batches["accuracy"] == one_by_one["accuracy"]
    assert sorted_batches["loss"] == pytest.approx(one_by_one["loss"], rel=1e-5)
