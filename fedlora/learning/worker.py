"""The per-process cache of a run: what a process builds once and every client round it serves reuses.

A :class:`Worker` holds the run's explicit parts, each typed: :attr:`Worker.data` (the
:class:`~fedlora.learning.client_data.ClientData`: splits, partitions, tokenizer, tokenised
partitions), :attr:`Worker.adapted` (the :class:`~fedlora.learning.adapted_model.AdaptedModel`:
the peft model at the initial state, and the round's protocol), the strategy and the task. A client
round is :func:`fedlora.learning.client_round.train_round`; :meth:`Worker.train_round` passes it
these parts and the client's DP plan. Built once per process and run configuration (:func:`get_worker`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import cached_property

import torch

from fedlora.config.errors import ConfigError
from fedlora.config.run import RunConfig
from fedlora.learning import client_round
from fedlora.learning.adapted_model import AdaptedModel
from fedlora.learning.client_data import ClientData
from fedlora.learning.model import device_for_worker
from fedlora.learning.tasks import Task, task_for
from fedlora.learning.train import LocalResult
from fedlora.lora import Tensors
from fedlora.privacy.accounting import ClientPlan, Step
from strategies import Strategy, get_strategy_class
from strategies.ranks import RankState

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
    """Data, model, strategy and task of one run, as seen from one process."""

    def __init__(self, cfg: RunConfig, *, num_partitions: int, label_names: tuple[str, ...] | None = None) -> None:
        self.cfg = cfg
        self.strategy: Strategy = get_strategy_class(cfg.strategy.name)(cfg.strategy, scaling=cfg.scaling)
        self.task: Task = task_for(cfg.task)
        self.device = device_for_worker()
        self.data = ClientData(cfg, self.task, num_partitions=num_partitions, label_names=label_names)
        self._plans: dict[int, ClientPlan] = {}  # DP-SGD plans by partition, calibrated on first use

    @cached_property
    def adapted(self) -> AdaptedModel:
        """The peft model at the strategy's initial state (built on first use: the data loads first)."""
        return AdaptedModel(self.cfg, self.strategy, self.task, labels=self.data.splits.label_names, device=self.device)

    def warm_up(self) -> Worker:
        """Load data and model now (bad paths, columns and modules fail here, not in a round)."""
        if self.cfg.train.bf16 and self.device.type != "cuda":
            raise ConfigError("train.bf16 (bfloat16 autocast) needs a CUDA GPU; this process has none")
        if self.cfg.task == "classification" and not self.data.splits.label_names:
            raise ConfigError("task=classification needs labelled data; instruction records need task=causal_lm")
        self.data.partitions  # noqa: B018 - bad partition settings fail now, before the model loads
        model = self.adapted.model
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and self.cfg.train.max_seq_len > limit:
            raise ConfigError(
                f"train.max_seq_len={self.cfg.train.max_seq_len} exceeds the model's maximum of {limit} positions"
            )
        labels = self.data.splits.label_names
        self.task.check_room(self.data.tokenizer, labels=labels, max_len=self.cfg.train.max_seq_len)
        log.debug("worker for strategy=%s on %s, %d torch threads", self.cfg.strategy.name, self.device,
                  torch.get_num_threads())  # fmt: skip
        return self

    def privacy_plan(self, partition_id: int) -> ClientPlan:
        """This client's DP-SGD plan (noise calibrated once per process; only with ``privacy=dp``)."""
        if partition_id not in self._plans:
            n = len(self.data.rows(partition_id))
            self._plans[partition_id] = client_round.privacy_plan(
                self.cfg, self.strategy, partition_id=partition_id, num_examples=n
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
        personal: Tensors | None = None,
        own: RankState | None = None,
    ) -> tuple[Tensors, int | None, LocalResult]:
        """:func:`fedlora.learning.client_round.train_round` on this process's data and model."""
        plan = self.privacy_plan(partition_id) if self.cfg.privacy.enabled and history is not None else None
        return client_round.train_round(
            self.cfg, self.data, self.adapted, partition_id, received,
            server_round=server_round, base=base, history=history, plan=plan, personal=personal, own=own,
        )  # fmt: skip

    def evaluate_personal(
        self,
        partition_id: int,
        received: Tensors,
        *,
        base: Tensors | None = None,
        personal: Tensors | None = None,
        label_mix: list[float] | None = None,
        own_rank: int | None = None,
    ) -> dict[str, float]:
        """Client ``partition_id``'s model on its test shard: what it would start a round from (``received``
        at its rank, its ``personal`` tensors, base delta ``base``); the task's metrics and ``examples``.
        ``label_mix`` (under DP: its released label counts): the shard is drawn in that mix instead;
        ``own_rank``: a self-pruning client's rank, below its assigned one."""
        data, protocol = self.data, self.adapted.protocol
        rows = data.test_shard(partition_id) if label_mix is None else data.released_test_shard(partition_id, label_mix)
        if not rows:
            return {"examples": 0}
        self.adapted.set_base(base or {})
        self.adapted.load(protocol.start(partition_id, received, server_round=0, personal=personal))
        protocol.rank_mask(partition_id, own=own_rank).apply(self.adapted.params)
        batches = data.personal_test_batches(partition_id, rows)
        return self.task.evaluate(self.adapted.model, batches, self.device, accuracy_only=True) | {
            "examples": len(rows)
        }

    def evaluate(self, received: Tensors, *, base: Tensors | None = None) -> dict[str, float]:
        """Central evaluation on the test split with the global adapter (and base delta) loaded."""
        self.adapted.set_base(base or {})
        self.adapted.load(received)
        return self.task.evaluate(self.adapted.model, self.data.test_batches, self.device)
