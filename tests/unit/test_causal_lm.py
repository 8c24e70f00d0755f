"""Causal-LM instruction tuning on the tiny Llama: the loss mask, DP per-sample gradients, exports, evaluation,
and bad input."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from opacus import GradSampleModule

from fedlora import lora
from fedlora.config.compose import compose
from fedlora.learning.causal_lm import CausalLM, CausalLMLoss, question, render
from fedlora.learning.decoding import Evaluation, ranking_scores
from fedlora.learning.worker import Worker
from fedlora.outputs.export import export_adapter, load_exported

TINY_LLAMA = ["model=tiny_llama", "data.synthetic_train=40", "data.synthetic_test=8", "clients=2",
              "train.max_seq_len=96", "train.batch_size=4", "train.local_steps=1"]  # fmt: skip


@pytest.fixture(scope="module")
def worker() -> Worker:
    cfg, _ = compose(TINY_LLAMA)
    return Worker(cfg, num_partitions=2).warm_up()


def test_the_loss_mask_covers_exactly_the_response_tokens(worker: Worker) -> None:
    tokenizer, labels = worker.data.tokenizer, worker.data.splits.label_names
    row = worker.data.tokenised(0)[0]
    text = worker.data.splits.train[worker.data.rows(0)[0]]
    response = labels[text["label"]]
    prompt = tokenizer(render(tokenizer, question(text["text"], labels)), add_special_tokens=False)["input_ids"]
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert row["input_ids"] == prompt + answer  # the chat template, then the label word and end-of-sequence
    for token, label, position in zip(row["input_ids"], row["labels"], range(len(row["labels"])), strict=True):
        assert label == (token if position >= len(prompt) else -100), position


def test_dp_per_sample_gradients_on_llama_lora_layers_sum_to_the_batch_gradient(worker: Worker) -> None:
    lora.set_trainable(worker.adapted.params, worker.adapted.protocol.trainable)
    batch = worker.task.collate(worker.data.tokenizer)([worker.data.tokenised(0)[i] for i in range(4)])
    criterion = worker.task.criterion()
    model = GradSampleModule(worker.adapted.model)
    model.train()
    worker.task.loss(model, batch, criterion).backward()
    trainable = [worker.adapted.params[k] for k in sorted(worker.adapted.protocol.trainable)]
    assert all(p.grad_sample.shape[0] == 4 for p in trainable)
    per_sample_mean = [p.grad_sample.mean(0) for p in trainable]  # mean reduction: the batch gradient
    batch_grads = [p.grad.clone() for p in trainable]
    model._close()
    for got, want in zip(per_sample_mean, batch_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    worker.adapted.model.zero_grad()


def test_an_exported_adapter_reloads_with_the_same_logits(worker: Worker, tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in worker.adapted.initial_state().items()}
    folder = export_adapter(worker, state, tmp_path / "adapter")
    batch = worker.task.collate(worker.data.tokenizer)([worker.data.tokenised(0)[i] for i in range(2)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    worker.adapted.model.eval()
    with torch.no_grad():
        expected = worker.adapted.model(**inputs).logits
        got = load_exported(folder).eval()(**inputs).logits
    torch.testing.assert_close(got, expected)


class Forced(torch.nn.Module):
    """A bigram model that always answers with one label: after its i-th token comes its (i+1)-th, after its
    last the end-of-sequence, after anything else its first token."""

    def __init__(self, answer: list[int], vocab: int) -> None:
        super().__init__()
        self.answer, self.vocab = answer, vocab

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, position_ids=None):
        nxt = {a: b for a, b in zip(self.answer, self.answer[1:], strict=False)}
        logits = torch.full((*input_ids.shape, self.vocab), -30.0)
        for b in range(input_ids.shape[0]):
            for t in range(input_ids.shape[1]):
                logits[b, t, nxt.get(int(input_ids[b, t]), self.answer[0])] = 0.0
        cache = type("Cache", (), {"crop": lambda self, tokens: None})()  # a bigram keeps no context
        return type("Out", (), {"logits": logits, "past_key_values": cache})()


def test_rank_classification_and_generation_agree_on_a_model_whose_answer_is_forced(worker: Worker) -> None:
    data: Evaluation = worker.data.test_batches
    forced_label = 1
    model = Forced(data.candidates[forced_label], len(worker.data.tokenizer))
    scores = CausalLM.ranking_accuracy(ranking_scores(model, data, torch.device("cpu")), data.truth)
    generated = CausalLM()._generation_accuracy(model, data, torch.device("cpu"))
    share = sum(t == forced_label for t in data.truth) / len(data.truth)
    assert scores == pytest.approx(share) and generated == pytest.approx(share)


def test_cached_ranking_scores_equal_each_sequence_scored_whole(worker: Worker) -> None:
    """The prompt-once, left-padded, cached scores equal log p(candidate | prompt) from one unpadded forward
    of prompt + candidate, for prompts of different lengths in one batch."""
    data: Evaluation = worker.data.test_batches
    assert len({len(p) for p in data.prompts}) > 1 and max(map(len, data.candidates)) > 1
    model = worker.adapted.model.eval()
    with torch.no_grad():
        cached = ranking_scores(model, data, torch.device("cpu"))
        for i, prompt in enumerate(data.prompts):
            for k, candidate in enumerate(data.candidates):
                logits = model(input_ids=torch.tensor([prompt + candidate])).logits[0].double().log_softmax(-1)
                whole = sum(float(logits[len(prompt) - 1 + j, t]) for j, t in enumerate(candidate))
                assert float(cached[i, k]) == pytest.approx(whole, abs=1e-4), (i, k)


def test_labelled_test_loss_read_off_the_ranking_equals_the_response_loss_of_a_forward_pass(worker: Worker) -> None:
    """With labels, evaluation runs the prompts once: the response loss it reports (the true label word's
    mean token NLL from the ranking's cached scores) equals the training loss on prompt + true response."""
    data: Evaluation = worker.data.test_batches
    assert data.truth and not data.batches  # no second pass is prepared
    tokenized = worker.task.tokenize(
        worker.data.splits.test, worker.data.tokenizer, max_len=worker.cfg.train.max_seq_len,
        labels=worker.data.splits.label_names,
    )  # fmt: skip
    batch = worker.task.collate(worker.data.tokenizer)(list(tokenized))
    model = worker.adapted.model.eval()
    with torch.no_grad():
        expected = float(CausalLMLoss()(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                        .logits, batch["labels"]))  # fmt: skip
    result = worker.task.evaluate(model, data, torch.device("cpu"))
    assert result["loss"] == pytest.approx(expected, rel=1e-4)
    assert result["test_perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    # personalised evaluation reports accuracy only: the same numbers, without the greedy generation
    brief = worker.task.evaluate(model, data, torch.device("cpu"), accuracy_only=True)
    assert "test_generation_accuracy" in result and "test_generation_accuracy" not in brief
    assert brief == {k: v for k, v in result.items() if k != "test_generation_accuracy"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # MiniLM's preset pools by the mean, which the config refuses first for a causal LM
        (["model=minilm", "task=causal_lm"], "is for encoder classifiers (model 'minilm'); use a causal LM"),
        (
            ["model=minilm", "model.pooling=cls", "task=causal_lm"],
            "task=causal_lm needs a decoder model; model 'minilm'",
        ),
        (["train.max_seq_len=20"], "train.max_seq_len=20 leaves no room for a response"),
        (["model.load_in_4bit=true"], "model.load_in_4bit needs a CUDA GPU"),
        (["data=files", "data.path=INSTRUCTIONS"], "instruction records need an output column"),
    ],
)
def test_bad_input_exits_2_with_one_line(overrides: list[str], message: str, tmp_path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text('{"instruction": "Say hi", "input": ""}\n' * 20)
    args = [a.replace("INSTRUCTIONS", str(records)) for a in [*TINY_LLAMA, *overrides]]
    done = subprocess.run([sys.executable, "-m", "fedlora.cli", "simulate", *args, "--dry-run"],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_the_round_line_of_instruction_data_shows_loss_and_perplexity() -> None:
    from fedlora.outputs.console import round_line

    row = {"round": 1, "test_accuracy": None, "test_loss": 2.5, "test_perplexity": 12.18, "wall_s": 3.0}
    line = round_line(row, 2)
    assert "loss 2.5000 ppl 12.2" in line and "acc -" not in line
    assert "not evaluated" in round_line({"round": 1, "wall_s": 1.0}, 2)


@pytest.mark.parametrize("model", ["smollm2", "tiny_llama"])
def test_a_decoder_preset_brings_a_sequence_length_its_prompts_fit(model: str) -> None:
    """At train.max_seq_len=64 a labelled text's prompt template left no room for a response (exit 2); the
    decoder presets bring 128, and a command-line value still wins."""
    from fedlora.cli import main

    assert compose([f"model={model}"])[0].train.max_seq_len == 128
    assert compose([f"model={model}", "train.max_seq_len=96"])[0].train.max_seq_len == 96
    assert main(["simulate", f"model={model}", "--dry-run"]) == 0  # the labelled default data: its room check
