"""The peft model of a run, built once per process, holding the strategy's initial state.

Every process draws the same initial state from the run seed (FFA-LoRA's A is never sent), so the
server and every client start from bit-identical adapters. The model is built when an
:class:`AdaptedModel` is made, and its initial state is read then: nothing happens on attribute access.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fedlora import lora
from fedlora.config.run import RunConfig
from fedlora.federation.protocol import Protocol
from fedlora.learning.model import build_peft_model
from fedlora.learning.tasks import Task
from fedlora.lora import AdapterKey, Tensors
from fedlora.seeds import Stream, generator
from strategies import Strategy


class AdaptedModel:
    """The base model with the run's LoRA adapters (and head), on ``device``, at the initial state."""

    def __init__(
        self, cfg: RunConfig, strategy: Strategy, task: Task, *, labels: tuple[str, ...], device: torch.device
    ) -> None:
        self.device = device
        lora_cfg = dataclasses.replace(cfg.lora, rank=cfg.model_rank, alpha=cfg.lora_alpha)
        model = build_peft_model(cfg.model, lora_cfg, labels=labels, seed=cfg.seed, task=task)
        strategy.prepare_model(model)
        model.to(device)
        self.model: Any = model
        self.params: dict[AdapterKey, torch.nn.Parameter] = lora.adapter_parameters(model)
        initial = strategy.initial_state(lora.read(self.params), generator=generator(Stream.INITIAL_STATE, cfg.seed))
        lora.write(self.params, initial)
        self._initial = initial
        self.protocol = Protocol(
            strategy, self.initial_state(), seed=cfg.seed, model_rank=cfg.model_rank,
            train_head=cfg.train.head == "train",
        )  # fmt: skip
        self._w0: Tensors | None = None  # the base weights, kept once a base delta is first set

    def initial_state(self) -> Tensors:
        """The strategy's initial state (identical in every process for a given seed); a copy."""
        return dict(self._initial)

    def load(self, received: Tensors) -> None:
        """Load the tensors the server sent into the model."""
        lora.write(self.params, received)

    def personal(self) -> Tensors:
        """The strategy's personal tensors as the model holds them now (after a client's round: that client's)."""
        return lora.read({k: self.params[k] for k in self.protocol.personal})

    @torch.no_grad()
    def set_base(self, delta: Tensors) -> None:
        """W = W0 + D for every adapted module (D keyed by ``Role.BASE``; missing: W0).

        Always from W0, never W += D: processes serve many nodes (simulation), each with
        its own D. W0 is copied the first time a delta is set (strategies that fold only).
        """
        if self._w0 is None:
            if not delta:
                return
            self._w0 = {k: w.detach().clone() for k, w in lora.base_weights(self.model).items()}
        for key, weight in lora.base_weights(self.model).items():
            w0 = self._w0[key]
            weight.copy_(w0 + delta[key].to(w0.device) if key in delta else w0)
