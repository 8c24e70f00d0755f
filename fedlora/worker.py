"""Per-process state and the work of a client round, with no Flower in it.

A :class:`Worker` holds what is heavy (the peft model, the tokenizer, the data and
its partitions) and is built once per process and run configuration
(:func:`get_worker`); every client round that the process serves reuses it and
only loads the adapter tensors it received. The ClientApp, the ServerApp's central
evaluation and the benchmark's plain loop all call the same methods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cached_property, partial

import torch
from torch.utils.data import DataLoader

from fedlora import lora
from fedlora.config import RunConfig
from fedlora.data import Splits, load_calibration, load_splits, partition
from fedlora.lora import LORA_ROLES, AdapterKey, Tensors
from fedlora.model import build_peft_model, device_for_worker, resolve_path
from fedlora.privacy import ClientPlan, Step, clip_and_noise, dp_generator, dp_sgd, make_plan, poisson_subsample
from fedlora.schedule import rounds_taken, scheduled
from fedlora.task import TASK
from fedlora.train import LocalResult, cycle, train_steps
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
    key = hashlib.sha256(json.dumps(cfg.to_flat() | extra, sort_keys=True).encode()).hexdigest()
    if key not in _WORKERS:
        _WORKERS.clear()  # one run per process at a time: do not keep an old model alive
        _WORKERS[key] = Worker(cfg, num_partitions=num_partitions, label_names=label_names)
    return _WORKERS[key]


def take(batches: Iterable[dict[str, torch.Tensor]], num_examples: int, *, size: int | None = None):
    """The first ``num_examples`` rows of ``batches``, cut into batches of ``size`` rows (None: as they come)."""
    left = num_examples
    for batch in batches:
        n = len(batch["labels"])
        step = size or n
        for i in range(0, n, step):
            if left <= 0:
                return
            part = min(step, n - i, left)
            yield {k: v[i : i + part] for k, v in batch.items()}
            left -= part


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from (run seed, round, client, ...): independent streams per tuple."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Worker:
    """Model, data and strategy of one run, as seen from one process."""

    def __init__(self, cfg: RunConfig, *, num_partitions: int, label_names: tuple[str, ...] | None = None) -> None:
        self.cfg = cfg
        self.num_partitions = num_partitions
        self.label_names = label_names
        self.strategy: Strategy = get_strategy_class(cfg.strategy.name)(cfg.strategy, scaling=cfg.scaling)
        self.device = device_for_worker()
        self._tokenised: dict[int, object] = {}
        self._plans: dict[int, ClientPlan] = {}  # DP-SGD plans by partition, calibrated on first use
        log.debug(
            "worker for strategy=%s on %s, %d torch threads", cfg.strategy.name, self.device, torch.get_num_threads()
        )

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

        return AutoTokenizer.from_pretrained(resolve_path(self.cfg.model.path))

    @cached_property
    def model(self) -> torch.nn.Module:
        """The peft model, holding the strategy's initial state (the same in every process)."""
        lora_cfg = dataclasses.replace(self.cfg.lora, rank=self.cfg.model_rank, alpha=self.cfg.lora_alpha)
        model = build_peft_model(self.cfg.model, lora_cfg, num_labels=self.splits.num_labels, seed=self.cfg.seed)
        if self.strategy.uses_r:
            lora.insert_r(model)
        model.to(self.device)
        params = lora.adapter_parameters(model)
        # Every process draws the same initial state from the run seed (FFA-LoRA's A is never sent).
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 0, -1))
        self._initial = self.strategy.initial_state(lora.read(params), generator=generator)
        lora.write(params, self._initial)
        if self.strategy.folds:  # W0, kept to set W = W0 + D for any node's D
            self._w0 = {k: w.detach().clone() for k, w in lora.base_weights(model).items()}
        return model

    @cached_property
    def params(self) -> dict[AdapterKey, torch.nn.Parameter]:
        return lora.adapter_parameters(self.model)

    @cached_property
    def trainable_keys(self) -> set[AdapterKey]:
        """LoRA tensors by the strategy's rule; dense (head) modules by ``train.head``."""
        train_head = self.cfg.train.head == "train"
        return {k for k in self.params if (self.strategy.trainable(k) if k.role in LORA_ROLES else train_head)}

    @cached_property
    def test_batches(self) -> DataLoader:
        data = TASK.tokenize(self.splits.test, self.tokenizer, max_len=self.cfg.train.max_seq_len)
        return DataLoader(data, batch_size=self.cfg.train.eval_batch_size, collate_fn=TASK.collate(self.tokenizer))

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
            self._tokenised[partition_id] = TASK.tokenize(rows, self.tokenizer, max_len=self.cfg.train.max_seq_len)
        return self._tokenised[partition_id]

    # -- what a round does --------------------------------------------------------------
    def initial_state(self) -> Tensors:
        """The strategy's initial state (identical in every process for a given seed)."""
        _ = self.model
        return dict(self._initial)

    def sent_down(self, state: Tensors) -> Tensors:
        """What the server broadcasts: the strategy's choice, less a frozen head (clients have it)."""
        down = self.strategy.broadcast(state)
        if self.cfg.train.head == "freeze":
            down = {k: v for k, v in down.items() if k.role in LORA_ROLES}
        return down

    def load(self, received: Tensors) -> None:
        """Load the tensors the server sent into this process's model."""
        lora.write(self.params, received)

    @torch.no_grad()
    def set_base(self, delta: Tensors) -> None:
        """W = W0 + D for every adapted module (D keyed by ``Role.BASE``; missing: W0). Folding strategies only.

        Always from W0, never W += D: processes serve many nodes (simulation), each with its own D.
        """
        if not self.strategy.folds:
            if delta:
                raise ValueError(f"{self.strategy.name} does not change base weights")
            return
        for key, weight in lora.base_weights(self.model).items():
            w0 = self._w0[key]
            weight.copy_(w0 + delta[key].to(w0.device) if key in delta else w0)

    def shuffled(self, data, *, seed: int) -> DataLoader:
        """Training batches in a seeded order; also seeds dropout, which draws from torch's global generator."""
        torch.manual_seed(seed)
        return DataLoader(
            data,
            batch_size=self.cfg.train.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=TASK.collate(self.tokenizer),
        )

    def optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """A fresh local optimizer for one round (``train.optimizer``)."""
        train = self.cfg.train
        if train.optimizer == "sgd":
            return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)

    def local_steps(self, num_examples: int) -> int:
        train = self.cfg.train
        if train.local_steps is not None:
            return train.local_steps
        return train.local_epochs * math.ceil(num_examples / train.batch_size)

    def client_rank(self, partition_id: int) -> int:
        return self.strategy.client_rank(partition_id, rank=self.cfg.model_rank)

    def privacy_plan(self, partition_id: int) -> ClientPlan:
        """This client's DP-SGD plan (noise calibrated once per process; only with ``privacy=dp``)."""
        if partition_id not in self._plans:
            n = len(self.rows(partition_id))
            cfg = self.cfg
            init = self.strategy.gradient_init and cfg.strategy.init_source == "clients"
            self._plans[partition_id] = make_plan(
                cfg.privacy,
                num_examples=n,
                batch_size=cfg.train.batch_size,
                steps=self.local_steps(n),
                rounds=rounds_taken(cfg, partition_id),
                init_release=init and partition_id in scheduled(cfg, 0),
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
    ) -> tuple[Tensors, int, LocalResult]:
        """Load ``received`` (and base delta ``base``), train on the partition; (payload, num_examples, result).

        With ``privacy=dp`` the round is DP-SGD and ``history`` (the client's accountant
        history, kept by the caller between rounds) is extended by this round's steps;
        the caller checks the budget first (:meth:`ClientPlan.affords`).
        """
        data = self.client_data(partition_id)
        self.set_base(base or {})
        self.load(self._start(partition_id, received, server_round=server_round))
        rank = self.client_rank(partition_id)
        if rank < self.cfg.model_rank:
            lora.mask_rank(self.params, rank)
        lora.set_trainable(self.params, self.trainable_keys)
        batches = self.shuffled(data, seed=derive_seed(self.cfg.seed, server_round, partition_id))
        optimizer = self.optimizer([self.params[k] for k in sorted(self.trainable_keys)])
        train = partial(
            train_steps,
            steps=self.local_steps(len(data)),
            device=self.device,
            after_step=(lambda: lora.mask_rank(self.params, rank)) if rank < self.cfg.model_rank else None,
        )
        if self.cfg.privacy.enabled:
            if history is None:
                raise ValueError("privacy=dp needs the client's accountant history")
            plan = self.privacy_plan(partition_id)
            privacy = self.cfg.privacy
            with dp_sgd(
                self.model,
                optimizer,
                batches,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=privacy.max_grad_norm,
                grad_sample_mode=privacy.grad_sample_mode,
                criterion=TASK.criterion(),
                generator=dp_generator(privacy, derive_seed(self.cfg.seed, server_round, partition_id, -5)),
            ) as (model, dp_optimizer, loader, criterion):
                result = train(
                    model, cycle(loader), loss_fn=partial(TASK.loss, criterion=criterion), optimizer=dp_optimizer
                )
            history.append(plan.round_step)
        else:
            result = train(self.model, cycle(batches), loss_fn=TASK.loss, optimizer=optimizer)
        trained = lora.read({k: self.params[k] for k in self.trainable_keys})  # copy only what was trained
        if rank < self.cfg.model_rank:
            trained = lora.truncate_rank(trained, rank)
        return self.strategy.payload(trained), len(data), result

    def _start(self, partition_id: int, received: Tensors, *, server_round: int) -> Tensors:
        """What the client loads before training: the strategy's start from ``received`` (seeded per round, client)."""
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, server_round, partition_id, -4))
        return self.strategy.start(received, like=self.initial_state(), generator=generator)

    def expected_reply(self, partition_id: int, state: Tensors, *, server_round: int) -> Tensors:
        """The payload the client would send had it not trained, from the server's full ``state``.

        Its keys and shapes are what the client's reply must have (by strategy, rank and
        trainable set), and its values are where the client's change is measured from.
        """
        begin = self.initial_state() | self._start(partition_id, state, server_round=server_round)
        rank = self.client_rank(partition_id)
        trained = {k: begin[k] for k in self.trainable_keys}
        if rank < self.cfg.model_rank:
            trained = lora.truncate_rank(trained, rank)
        return self.strategy.payload(trained)

    def base_shapes(self) -> Tensors:
        """Zeros shaped as the adapted modules' base weights (``Role.BASE``): a gradient reply's form."""
        return {k: torch.zeros(w.shape, dtype=w.dtype) for k, w in lora.base_weights(self.model).items()}

    def base_gradients(self, data, *, num_examples: int, seed: int) -> tuple[Tensors, int]:
        """Summed gradients of the adapted modules' base weights W0 (``Role.BASE``), with the adapter off.

        Over the first ``num_examples`` rows of ``data`` in a seeded order (LoRA-SB's
        initialisation, no DP). Returns (gradients, rows used).
        """
        with self._base_gradients() as backward:
            seen = sum(backward(batch) for batch in take(self.shuffled(data, seed=seed), num_examples))
            weights = lora.base_weights(self.model)
            return {k: w.grad.detach().to("cpu", copy=True) for k, w in weights.items()}, seen

    def private_base_gradients(
        self, data, *, rate: float, noise_multiplier: float, generator: torch.Generator, seed: int
    ) -> tuple[Tensors, int]:
        """The same under DP: a Poisson subsample of ``data`` at ``rate`` drawn from ``generator``,
        each example's gradient clipped to ``privacy.max_grad_norm``, Gaussian noise from ``generator``.
        ``seed`` seeds dropout only (torch's global generator), as in training.

        Returns (noised gradient sum, rows in the subsample).
        """
        torch.manual_seed(seed)
        rows = data.select(poisson_subsample(len(data), rate, generator=generator))
        weights = lora.base_weights(self.model)
        zeros = {k: torch.zeros(w.shape, dtype=w.dtype) for k, w in weights.items()}
        batches = DataLoader(rows, batch_size=1, collate_fn=TASK.collate(self.tokenizer))
        with self._base_gradients() as backward:

            def per_example() -> Iterator[Tensors]:
                for row in batches:
                    backward(row)
                    yield {k: w.grad.detach().to("cpu", copy=True) for k, w in weights.items()}
                    for w in weights.values():
                        w.grad = None

            return clip_and_noise(
                per_example(),
                zeros,
                max_grad_norm=self.cfg.privacy.max_grad_norm,
                noise_multiplier=noise_multiplier,
                generator=generator,
            )

    @contextmanager
    def _base_gradients(self) -> Iterator[Callable[[dict[str, torch.Tensor]], int]]:
        """Within the block: adapter off, base weights take gradients; yields backward(batch) -> rows."""
        weights = lora.base_weights(self.model)
        self.model.train()
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None

        def backward(batch: dict[str, torch.Tensor]) -> int:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            n = len(batch["labels"])
            (TASK.loss(self.model, batch) * n).backward()  # mean loss -> sum over examples
            return n

        try:
            with self.model.disable_adapter():
                yield backward
        finally:
            for w in weights.values():
                w.requires_grad_(False)
                w.grad = None

    def init_round(
        self, partition_id: int, *, num_examples: int, server_round: int = 0, history: list[Step] | None = None
    ) -> tuple[Tensors, int]:
        """A client's share of a gradient initialisation: summed base-weight gradients on its partition.

        With ``privacy=dp``: over a Poisson subsample of expected size ``num_examples``, clipped
        per example and noised (private randomness); ``history`` gets the release.
        """
        seed = derive_seed(self.cfg.seed, server_round, partition_id)
        data = self.client_data(partition_id)
        if not self.cfg.privacy.enabled:
            return self.base_gradients(data, num_examples=num_examples, seed=seed)
        if history is None:
            raise ValueError("privacy=dp needs the client's accountant history")
        plan = self.privacy_plan(partition_id)
        out = self.private_base_gradients(
            data,
            rate=min(1.0, num_examples / len(data)),
            noise_multiplier=plan.noise_multiplier,
            generator=dp_generator(self.cfg.privacy, derive_seed(seed, -5)),
            seed=seed,
        )
        history.append(plan.init_step)
        return out

    def total_steps(self) -> int:
        """Optimizer steps a client's model takes over the run: rounds x local steps (of an average client)."""
        return self.cfg.rounds * self.local_steps(len(self.splits.train) // max(1, self.cfg.clients))

    def initialise(self, state: Tensors, gradients: Tensors) -> Tensors:
        """The strategy's gradient initialisation, seeded by the run; the result is loaded here too."""
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 0, -2))
        state = self.strategy.initialise(
            state, gradients, lr=self.cfg.train.lr, total_steps=self.total_steps(), generator=generator
        )
        self.load(state)
        return state

    @cached_property
    def calibration(self):
        """The tokenised calibration file named by ``strategy.init_source`` (a public set the server may use)."""
        rows = load_calibration(self.cfg.data, self.cfg.strategy.init_source, label_names=self.splits.label_names)
        return TASK.tokenize(rows, self.tokenizer, max_len=self.cfg.train.max_seq_len)

    def evaluate(self, received: Tensors, *, base: Tensors | None = None) -> dict[str, float]:
        """Central evaluation on the test split with the global adapter (and base delta) loaded."""
        self.set_base(base or {})
        self.load(received)
        return TASK.evaluate(self.model, self.test_batches, self.device)
