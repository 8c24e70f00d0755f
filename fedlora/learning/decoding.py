"""Decoding with a causal LM: label ranking over one shared key-value cache per batch of prompts, and
greedy generation; what the evaluation of ``task=causal_lm`` and ``fedlora generate`` run."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Evaluation:
    """What a causal LM is evaluated on: response batches, and (with labels) ranking and generation inputs."""

    batches: list[dict[str, torch.Tensor]]  # prompt + response, for loss and perplexity (without labels)
    prompts: list[list[int]]  # the rendered prompts' ids (with labels)
    truth: list[int]  # each prompt's true label
    candidates: list[list[int]]  # each label word's ids, end-of-sequence included
    labels: tuple[str, ...]
    pad_id: int
    batch_size: int
    decode: Any  # ids -> text (the tokenizer's)


def ranking_scores(model: nn.Module, data: Evaluation, device: torch.device) -> torch.Tensor:
    """log p(candidate | prompt) for every prompt and label word, (prompts, candidates).

    Each batch of prompts runs once, left-padded (positions counted from each prompt's
    first real token, as without padding), keeping its key-value cache; each candidate
    then continues that cache with its tokens but the last, and the cache is cropped
    back to the prompts. The prompt, most of the tokens, is computed once instead of
    once per label word.
    """
    n = len(data.prompts)
    scores = torch.empty((n, len(data.candidates)), dtype=torch.float64)
    for start in range(0, n, data.batch_size):
        prompts = data.prompts[start : start + data.batch_size]
        width = max(map(len, prompts))
        ids = torch.tensor([[data.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True)  # fmt: skip
        cache, first = cache_of(out), out.logits[:, -1].double().log_softmax(-1)
        lengths = mask.sum(-1, keepdim=True)
        for k, candidate in enumerate(data.candidates):
            total = first[:, candidate[0]].clone()
            if len(candidate) > 1:
                fed = torch.tensor(candidate[:-1], device=device).expand(len(prompts), -1)
                steps = fed.shape[1]
                cont = model(
                    input_ids=fed,
                    attention_mask=torch.cat([mask, torch.ones_like(fed)], dim=1),
                    position_ids=lengths + torch.arange(steps, device=device),
                    use_cache=True,
                    **{cache_keyword(model): cache},
                )
                logprobs = cont.logits.double().log_softmax(-1)
                wanted = torch.tensor(candidate[1:], device=device).expand(len(prompts), -1)
                total += logprobs.gather(-1, wanted[..., None]).squeeze(-1).sum(-1)
                cache.crop(-steps)  # back to the prompts for the next candidate (transformers 5: tokens removed)
            scores[start : start + len(prompts), k] = total.cpu()
    return scores


def generate_ids(model: nn.Module, ids: torch.Tensor, *, max_new_tokens: int, eos: int) -> list[int]:
    """Greedy decoding of up to ``max_new_tokens`` after ``ids`` (1, T); the new ids, end-of-sequence excluded."""
    out: list[int] = []
    past = None
    step = ids
    for _ in range(max_new_tokens):
        result = model(input_ids=step, use_cache=True, **({cache_keyword(model): past} if past is not None else {}))
        past = cache_of(result)
        token = int(result.logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
        step = torch.tensor([[token]], device=ids.device)
    return out


def cache_keyword(model: nn.Module) -> str:
    """The forward argument that takes a key-value cache: ``cache`` in recent transformers (which warns on every
    call given ``past_key_values``), ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """The key-value cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
