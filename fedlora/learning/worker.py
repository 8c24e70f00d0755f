"""Per-process state and the work of a client round, with no Flower in it.

A :class:`Worker` holds what is heavy (the peft model, the tokenizer, the data and
its partitions) and is built once per process and run configuration
(:func:`get_worker`); every client round that the process serves reuses it and
only loads the adapter tensors it received. It trains and evaluates; what the
round exchanges is :class:`fedlora.federation.protocol.Protocol`'s, and method-specific steps
live with the method (``fedlora.learning.gradient_init``, ``fedlora.federation.folding``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from functools import cached_property, partial
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedlora import lora
from fedlora.config.groups import ConfigError
from fedlora.config.run import RunConfig
from fedlora.federation.protocol import Protocol
from fedlora.federation.schedule import rounds_taken, scheduled
from fedlora.learning.data import Splits, load_splits, partition
from fedlora.learning.model import build_peft_model, device_for_worker, model_folder
from fedlora.learning.tasks import task_for
from fedlora.learning.train import LocalResult, MicroBatches, cycle, local_steps, make_optimizer, round_lr, train_steps
from fedlora.lora import AdapterKey, Tensors
from fedlora.privacy.accounting import ClientPlan, Step, make_plan
from fedlora.privacy.dp_sgd import dp_generator, dp_sgd
from fedlora.seeds import Stream, generator, seed_of
from strategies import Strategy, get_strategy_class

log = logging.getLogger(__name__)

_WORKERS: dict[str, Worker] = {}


def get_worker(
    cfg: RunConfig, *, num_partitions: int | None = None, label_names: tuple[str, ...] | None = None
) -> Worker:
    """The cached worker for ``cfg`` in this process (built on first use).

    ``num_partitions``: how many parts ``cfg.data`` is split into (default ``cfg.clients``);
    ``label_names``: the run's labels, when this process's data may hold only some of them.
    """
    num_partitions = num_partitions or cfg.clients
    extra = {"_parts": num_partitions, "_labels": list(label_names or ())}
    # simulation.* (Ray resources) does not change what a worker holds, and the apps rebuild the
    # config from the Flower run config, which does not carry it.
    flat = {k: v for k, v in cfg.to_flat().items() if not k.startswith("simulation.")}
    key = hashlib.sha256(json.dumps(flat | extra, sort_keys=True).encode()).hexdigest()
    if key not in _WORKERS:
        _WORKERS.clear()  # one run per process at a time: do not keep an old model alive
        _WORKERS[key] = Worker(cfg, num_partitions=num_partitions, label_names=label_names)
    return _WORKERS[key]


class Worker:
    """Model, data and strategy of one run, as seen from one process."""

    def __init__(self, cfg: RunConfig, *, num_partitions: int, label_names: tuple[str, ...] | None = None) -> None:
        self.cfg = cfg
        self.num_partitions = num_partitions
        self.label_names = label_names
        self.strategy: Strategy = get_strategy_class(cfg.strategy.name)(cfg.strategy, scaling=cfg.scaling)
        self.task = task_for(cfg.task)
        self.device = device_for_worker()
        self._tokenised: dict[int, object] = {}
        self._offsets: dict[int, torch.Tensor] = {}  # partition -> its logit adjustment
        self._lengths: dict[int, list[int]] = {}  # partition -> token count of each example
        self._plans: dict[int, ClientPlan] = {}  # DP-SGD plans by partition, calibrated on first use
        self._w0: Tensors | None = None  # the base weights, kept once a base delta is first set

    def warm_up(self) -> Worker:
        """Load data and model now (bad paths, columns and modules fail here, not in a round)."""
        if self.cfg.train.bf16 and self.device.type != "cuda":
            raise ConfigError("train.bf16 (bfloat16 autocast) needs a CUDA GPU; this process has none")
        if self.cfg.task == "classification" and not self.splits.label_names:
            raise ConfigError("task=classification needs labelled data; instruction records need task=causal_lm")
        _ = self.splits, self.partitions, self.model
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and self.cfg.train.max_seq_len > limit:
            raise ConfigError(
                f"train.max_seq_len={self.cfg.train.max_seq_len} exceeds the model's maximum of {limit} positions"
            )
        self.task.check_room(self.tokenizer, labels=self.splits.label_names, max_len=self.cfg.train.max_seq_len)
        log.debug("worker for strategy=%s on %s, %d torch threads", self.cfg.strategy.name, self.device,
                  torch.get_num_threads())  # fmt: skip
        return self

    # -- heavy things, built lazily and once ---------------------------------------
    @cached_property
    def splits(self) -> Splits:
        return load_splits(self.cfg.data, seed=self.cfg.seed, label_names=self.label_names)

    @cached_property
    def partitions(self) -> list[list[int]]:
        return partition(
            self.splits.train["label"], self.cfg.partition, num_partitions=self.num_partitions, seed=self.cfg.seed
        )

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return self.task.prepare_tokenizer(AutoTokenizer.from_pretrained(model_folder(self.cfg.model)))

    @cached_property
    def model(self) -> torch.nn.Module:
        """The peft model, holding the strategy's initial state (the same in every process)."""
        lora_cfg = dataclasses.replace(self.cfg.lora, rank=self.cfg.model_rank, alpha=self.cfg.lora_alpha)
        model = build_peft_model(
            self.cfg.model, lora_cfg, labels=self.splits.label_names, seed=self.cfg.seed, task=self.task
        )
        self.strategy.prepare_model(model)
        model.to(self.device)
        params = lora.adapter_parameters(model)
        # Every process draws the same initial state from the run seed (FFA-LoRA's A is never sent).
        initial = self.strategy.initial_state(
            lora.read(params), generator=generator(Stream.INITIAL_STATE, self.cfg.seed)
        )
        lora.write(params, initial)
        self._initial = initial
        return model

    @cached_property
    def protocol(self) -> Protocol:
        """What this run's rounds exchange (built from the initial state)."""
        cfg = self.cfg
        return Protocol(
            self.strategy, self.initial_state(), seed=cfg.seed, model_rank=cfg.model_rank,
            train_head=cfg.train.head == "train",
        )  # fmt: skip

    @cached_property
    def params(self) -> dict[AdapterKey, torch.nn.Parameter]:
        return lora.adapter_parameters(self.model)

    @cached_property
    def test_batches(self) -> Any:
        """What the task evaluates on (batches of the test split; a causal LM's ranking inputs too)."""
        train = self.cfg.train
        return self.task.evaluation_data(
            self.splits.test, self.tokenizer, max_len=train.max_seq_len, labels=self.splits.label_names,
            batch_size=train.eval_batch_size,
        )  # fmt: skip

    def initial_state(self) -> Tensors:
        """The strategy's initial state (identical in every process for a given seed)."""
        _ = self.model
        return dict(self._initial)

    def rows(self, partition_id: int) -> list[int]:
        """Client ``partition_id``'s rows of the training split: its partition, or all of them when the
        data is not split (``num_partitions`` 1: a node's own file)."""
        if self.num_partitions == 1:
            return self.partitions[0]
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(f"partition-id {partition_id} outside 0..{self.num_partitions - 1}")
        return self.partitions[partition_id]

    def client_data(self, partition_id: int):
        """The tokenised partition, cached: tokenised on first use by this process."""
        if partition_id not in self._tokenised:
            rows = self.splits.train.select(self.rows(partition_id))
            self._tokenised[partition_id] = self.task.tokenize(
                rows, self.tokenizer, max_len=self.cfg.train.max_seq_len, labels=self.splits.label_names
            )
        return self._tokenised[partition_id]

    def lengths(self, partition_id: int) -> list[int]:
        """The token count of each of the client's examples (cached): physical batches group similar lengths."""
        if partition_id not in self._lengths:
            self._lengths[partition_id] = [len(ids) for ids in self.client_data(partition_id)["input_ids"]]
        return self._lengths[partition_id]

    def label_offset(self, partition_id: int) -> torch.Tensor | None:
        """The client's logit adjustment from its exact label counts (``train.logit_adjustment``; None when
        off), computed once per process. Under DP see :meth:`noised_prior`."""
        tau = self.cfg.train.logit_adjustment
        if not tau:
            return None
        if partition_id not in self._offsets:
            labels = self.client_data(partition_id)["labels"]
            self._offsets[partition_id] = self.task.label_offset(labels, len(self.splits.label_names), tau=tau)
        return self._offsets[partition_id]

    def noised_prior(self, partition_id: int, generator: torch.Generator) -> tuple[torch.Tensor | None, int | None]:
        """Under DP: this round's label counts noised by ``privacy.label_noise`` from ``generator`` (a release,
        charged with the round); (the logit adjustment they give, the example count they sum to, at least 1).
        (None, None) when logit adjustment is off."""
        tau = self.cfg.train.logit_adjustment
        if not tau:
            return None, None
        labels, noise = self.client_data(partition_id)["labels"], self.cfg.privacy.label_noise
        counts = self.task.label_counts(labels, len(self.splits.label_names), noise_std=noise, generator=generator)
        return self.task.prior_offset(counts, tau=tau), max(1, round(float(counts.sum())))

    # -- loading what the server sent ------------------------------------------------------
    def load(self, received: Tensors) -> None:
        """Load the tensors the server sent into this process's model."""
        lora.write(self.params, received)

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

    # -- one client round ------------------------------------------------------------------
    def shuffled(self, data, *, seed: int, micro: bool = False) -> DataLoader | MicroBatches:
        """Training batches in a seeded order; also seeds dropout, which draws from torch's global generator.

        ``micro`` (with ``train.micro_batch_size``): the same batches, each as its length-ordered
        micro-batches (:class:`MicroBatches`)."""
        torch.manual_seed(seed)
        pieces = self.cfg.train.micro_batch_size if micro else None
        collate = self.task.collate(self.tokenizer)
        batches = DataLoader(
            data,
            batch_size=self.cfg.train.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=collate if pieces is None else list,
        )
        return batches if pieces is None else MicroBatches(batches, size=pieces, collate=collate)

    def privacy_plan(self, partition_id: int) -> ClientPlan:
        """This client's DP-SGD plan (noise calibrated once per process; only with ``privacy=dp``)."""
        if partition_id not in self._plans:
            n, init = len(self.rows(partition_id)), self.strategy.gradient_init
            round_zero = scheduled(self.cfg, 0)  # the server splits the init's examples among them
            self._plans[partition_id] = make_plan(
                self.cfg.privacy,
                num_examples=n,
                batch_size=self.cfg.train.batch_size,
                steps=local_steps(self.cfg.train, n),
                rounds=rounds_taken(self.cfg, partition_id),
                init_release=init is not None and init.from_clients and partition_id in round_zero,
                init_share=math.ceil(init.samples / len(round_zero)) if init is not None else None,
                label_prior=bool(self.cfg.train.logit_adjustment),
            )
        return self._plans[partition_id]

    def train_round(
        self,
        partition_id: int,
        received: Tensors,
        *,
        server_round: int,
        base: Tensors | None = None,
        history: list[Step] | None = None,
    ) -> tuple[Tensors, int | None, LocalResult]:
        """Load ``received`` (and base delta ``base``), train on the partition; (payload, num_examples, result).

        With ``privacy=dp`` the round is DP-SGD and ``history`` (the client's accountant
        history, kept by the caller between rounds) is extended by this round's steps;
        the caller checks the budget first (:meth:`ClientPlan.affords`). ``num_examples`` is
        then the sum of the round's noised label counts (None without logit adjustment),
        unless ``privacy.public_counts`` declares the exact count public.
        """
        data = self.client_data(partition_id)
        self.set_base(base or {})
        self.load(self.protocol.start(partition_id, received, server_round=server_round))
        mask = self.protocol.rank_mask(partition_id)
        mask.apply(self.params)
        lora.set_trainable(self.params, self.protocol.trainable)
        seed = seed_of(Stream.LOCAL_BATCHES, self.cfg.seed, server_round=server_round, client=partition_id)
        private = self.cfg.privacy.enabled  # DP-SGD cuts its Poisson batches itself (privacy.max_physical_batch_size)
        batches = self.shuffled(data, seed=seed, micro=not private)
        lr = round_lr(self.cfg.train, server_round, self.cfg.rounds)
        optimizer = make_optimizer(self.cfg.train, [self.params[k] for k in sorted(self.protocol.trainable)], lr=lr)
        train = partial(
            train_steps,
            steps=local_steps(self.cfg.train, len(data)),
            device=self.device,
            after_step=partial(mask.apply, self.params),
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16):
            result, noised_count = self._train(train, optimizer, batches, partition_id, server_round, history)
        trained = lora.read({k: self.params[k] for k in self.protocol.trainable})  # copy only what was trained
        exact = not private or self.cfg.privacy.public_counts
        return self.strategy.payload(mask.view(trained)), len(data) if exact else noised_count, result

    def _train(self, train, optimizer, batches, partition_id: int, server_round: int, history):
        """The round's steps: plain, or DP-SGD (Opacus) charging ``history``; (result, noised example count)."""
        if self.cfg.privacy.enabled:
            if history is None:
                raise ValueError("privacy=dp needs the client's accountant history")
            plan, privacy = self.privacy_plan(partition_id), self.cfg.privacy
            unsafe_seed = seed_of(Stream.UNSAFE_DP, self.cfg.seed, server_round=server_round, client=partition_id)
            g = dp_generator(privacy, unsafe_seed)
            offset, noised_count = self.noised_prior(partition_id, g)  # charged below
            with dp_sgd(
                self.model,
                optimizer,
                batches,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=privacy.max_grad_norm,
                grad_sample_mode=privacy.grad_sample_mode,
                criterion=self.task.criterion(),
                generator=g,
                max_physical_batch_size=privacy.max_physical_batch_size or self.cfg.train.micro_batch_size,
                lengths=self.lengths(partition_id),
            ) as (model, dp_optimizer, loader, criterion):
                result = train(model, cycle(loader), loss_fn=self._loss(criterion, offset), optimizer=dp_optimizer)
            history.extend(plan.round_steps)
            return result, noised_count
        loss_fn = self._loss(None, self.label_offset(partition_id))
        return train(self.model, cycle(batches), loss_fn=loss_fn, optimizer=optimizer), None

    def _loss(self, criterion, offset: torch.Tensor | None):
        """The task's training loss, with the label offset when there is one (causal LMs take none)."""
        loss = partial(self.task.loss, criterion=criterion)
        return loss if offset is None else partial(loss, offset=offset)

    def evaluate(self, received: Tensors, *, base: Tensors | None = None) -> dict[str, float]:
        """Central evaluation on the test split with the global adapter (and base delta) loaded."""
        self.set_base(base or {})
        self.load(received)
        return self.task.evaluate(self.model, self.test_batches, self.device)
