"""Causal-LM instruction tuning: prompts, response-only loss, label ranking, generation, perplexity.

Each record is a prompt and a response. Instruction records (``instruction``, optional
``input``, ``output``) give them directly; labelled texts are classification as
instruction following (as FlowerTune's finance challenge): the prompt asks for one of
the label words, the response is the true one. The prompt goes through the
tokenizer's chat template when it has one (a user turn, then the assistant's turn
opened), else a plain "### Instruction / ### Response" template.

Training loss: cross-entropy on the response tokens (and the end-of-sequence token)
only; each sequence's mean, averaged over the batch, so that every example weighs the
same (as DP-SGD's per-sample accounting assumes). Length: the response is never cut.
A prompt too long for ``max_seq_len`` loses the start of its text (the template
stays); an example whose response alone leaves less than ``MIN_TEXT`` tokens for the
text is dropped and counted in the log; a template that leaves no room for any
response is refused.

Evaluation: held-out response loss and perplexity; with labels, accuracy by ranking
the label words' log-likelihoods (every test example), and accuracy of greedy
generation (normalised exact match) on the first ``GENERATE`` test examples.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from datasets import Dataset
from torch import nn

from fedlora.config.groups import ConfigError
from fedlora.learning.decoding import Evaluation, generate_ids, ranking_scores

log = logging.getLogger(__name__)

MIN_TEXT = 8  # tokens of the text a prompt must keep
GENERATE = 64  # test examples whose answer is also generated greedily
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def question(text: str, labels: tuple[str, ...]) -> str:
    """The user's turn: the instruction itself, or a request for one of ``labels``."""
    if not labels:
        return text
    return f"Classify the text as one of: {', '.join(labels)}. Answer with the label only.\n\nText: {text}"


def render(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model expects it: its chat template (assistant's turn opened), or the plain one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def normalise(answer: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", answer.lower()).strip()


class CausalLMLoss(nn.Module):
    """Mean over the response tokens of each sequence, then over the batch (``reduction="none"``: per sequence).

    logits: (B, T, V); labels: (B, T) with -100 where no loss is taken.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted, targets = logits[:, :-1].float(), labels[:, 1:]
        mask = targets != -100
        tokens = nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]), targets.clamp(min=0).reshape(-1), reduction="none"
        ).view(targets.shape)
        per_sequence = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_sequence if self.reduction == "none" else per_sequence.mean()


class CausalLM:
    """A decoder LM fine-tuned on prompts and responses."""

    name = "causal_lm"
    metric_columns = ("test_perplexity", "test_generation_accuracy")
    peft_task_type = "CAUSAL_LM"

    def build(self, path: str, *, labels: tuple[str, ...], pretrained: bool, architecture: dict[str, Any]) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        if pretrained:
            return AutoModelForCausalLM.from_pretrained(path, **architecture)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, **architecture))

    def heads(self, model: nn.Module) -> list[str]:
        return []  # nothing new to train in full: the LM head is the pretrained (tied) one

    def prepare_tokenizer(self, tokenizer: Any) -> Any:
        if tokenizer.pad_token is None:  # e.g. Llama's: pad with end-of-sequence (labels mask it out)
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    # -- records -> token ids ----------------------------------------------------------------------
    def encode(self, tokenizer: Any, text: str, response: str | None, *, labels: tuple[str, ...], max_len: int):
        """(prompt ids, response ids) within ``max_len``, or None when the response leaves no room for the text."""
        eos = [tokenizer.eos_token_id]
        answer = tokenizer(response, add_special_tokens=False)["input_ids"] + eos if response is not None else []
        skeleton = len(tokenizer(render(tokenizer, question("", labels)), add_special_tokens=False)["input_ids"])
        room = max_len - skeleton - len(answer)
        if room < MIN_TEXT:
            return None
        text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(text_ids) > room:
            text = tokenizer.decode(text_ids[-room:])  # keep the end of the text: the template and the question stay
        prompt = tokenizer(render(tokenizer, question(text, labels)), add_special_tokens=False)["input_ids"]
        return prompt[: max_len - len(answer)], answer

    def check_room(self, tokenizer: Any, *, labels: tuple[str, ...], max_len: int) -> None:
        """Refuse a template and length that leave no room for a response."""
        skeleton = len(tokenizer(render(tokenizer, question("", labels)), add_special_tokens=False)["input_ids"])
        longest = max((len(tokenizer(w, add_special_tokens=False)["input_ids"]) + 1 for w in labels), default=1)
        if skeleton + MIN_TEXT + longest > max_len:
            raise ConfigError(
                f"train.max_seq_len={max_len} leaves no room for a response: the prompt template alone takes "
                f"{skeleton} tokens; raise train.max_seq_len to at least {skeleton + MIN_TEXT + longest + 16}"
            )

    def tokenize(self, data: Dataset, tokenizer: Any, *, max_len: int, labels: tuple[str, ...] = ()) -> Dataset:
        """input_ids, attention_mask and labels (-100 on the prompt): loss on the response only."""
        self.check_room(tokenizer, labels=labels, max_len=max_len)
        rows = {"input_ids": [], "attention_mask": [], "labels": []}
        dropped = 0
        for row in data:
            response = labels[row["label"]] if labels else row["response"]
            encoded = self.encode(tokenizer, row["text"], response, labels=labels, max_len=max_len)
            if encoded is None:
                dropped += 1
                continue
            prompt, answer = encoded
            rows["input_ids"].append(prompt + answer)
            rows["attention_mask"].append([1] * (len(prompt) + len(answer)))
            rows["labels"].append([-100] * len(prompt) + answer)
        if dropped:
            log.warning("%d of %d examples dropped: their response leaves no room within train.max_seq_len=%d",
                        dropped, len(data), max_len)  # fmt: skip
        return Dataset.from_dict(rows)

    def collate(self, tokenizer: Any):
        pad = tokenizer.pad_token_id

        def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
            width = max((len(r["input_ids"]) for r in rows), default=1)

            def padded(key: str, value: int) -> torch.Tensor:
                return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows], dtype=torch.long)

            if not rows:  # an empty Poisson batch
                return {k: torch.zeros((0, 1), dtype=torch.long) for k in ("input_ids", "attention_mask", "labels")}
            return {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0),
                    "labels": padded("labels", -100)}  # fmt: skip

        return collate

    def criterion(self) -> nn.Module:
        return CausalLMLoss()

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], criterion: nn.Module | None = None
    ) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return (criterion or self.criterion())(logits, batch["labels"])

    # -- evaluation ----------------------------------------------------------------------------
    def evaluation_data(
        self, data: Dataset, tokenizer: Any, *, max_len: int, labels: tuple[str, ...], batch_size: int
    ) -> Evaluation:
        batches = []
        if not labels:  # with labels the response loss comes from the ranking's scores (the same forward pass)
            tokenized = self.tokenize(data, tokenizer, max_len=max_len, labels=labels)
            collate = self.collate(tokenizer)
            batches = [collate([tokenized[j] for j in range(i, min(i + batch_size, len(tokenized)))])
                       for i in range(0, len(tokenized), batch_size)]  # fmt: skip
        else:
            self.check_room(tokenizer, labels=labels, max_len=max_len)
        prompts, truth = [], []
        if labels:
            for row in data:
                encoded = self.encode(tokenizer, row["text"], labels[row["label"]], labels=labels, max_len=max_len)
                if encoded is not None:
                    prompts.append(encoded[0])
                    truth.append(row["label"])
        candidates = [tokenizer(w, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for w in labels]
        return Evaluation(
            batches, prompts, truth, candidates, labels, tokenizer.pad_token_id, batch_size,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        )  # fmt: skip

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, data: Evaluation, device: torch.device, *, accuracy_only: bool = False
    ) -> dict[str, float]:
        """Response loss and perplexity; with labels, ranking accuracy (every prompt) and generation accuracy
        (greedy decoding of ``GENERATE`` prompts, the slow part: skipped with ``accuracy_only``).

        With labels the response is the true label word and end-of-sequence, which is one of the
        ranked candidates: its loss (the mean of its tokens' negative log-likelihoods, as in training)
        is read off the ranking's scores instead of a second forward pass over every prompt.
        """
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        if data.labels:
            scores = ranking_scores(model, data, device)
            truth = torch.tensor(data.truth, dtype=torch.long)
            lengths = torch.tensor([len(c) for c in data.candidates], dtype=torch.float64)
            true_scores = scores.gather(1, truth[:, None]).squeeze(1) if len(truth) else scores[:0, 0]
            loss = float((-true_scores / lengths[truth]).mean()) if len(truth) else math.nan
            out["accuracy"] = self.ranking_accuracy(scores, data.truth)
            if not accuracy_only:
                out["test_generation_accuracy"] = self._generation_accuracy(model, data, device)
        else:
            criterion = CausalLMLoss()
            criterion.reduction = "none"
            losses = []
            for batch in data.batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                losses.append(criterion(logits, batch["labels"]))
            loss = float(torch.cat(losses).mean()) if losses else math.nan
        model.train(was_training)
        return {"loss": loss, "test_perplexity": math.exp(loss) if loss < 50 else math.inf, **out}

    @staticmethod
    def ranking_accuracy(scores: torch.Tensor, truth: list[int]) -> float:
        """Share of prompts whose true label word (with end-of-sequence) is the most likely of the label words."""
        return float((scores.argmax(1) == torch.tensor(truth)).float().mean()) if truth else math.nan

    def _generation_accuracy(self, model: nn.Module, data: Evaluation, device: torch.device) -> float:
        """Greedy answers to the first ``GENERATE`` prompts, normalised, against the true label word."""
        longest = max(map(len, data.candidates))
        correct = total = 0
        for i in range(min(GENERATE, len(data.prompts))):
            ids = torch.tensor([data.prompts[i]], device=device)
            answer = data.decode(generate_ids(model, ids, max_new_tokens=longest + 2, eos=data.candidates[0][-1]))
            total += 1
            correct += int(normalise(answer) == normalise(data.labels[data.truth[i]]))
        return correct / total if total else math.nan
