"""The local training loop: plain PyTorch, no Flower."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedlora.config.groups import TrainConfig
from fedlora.federation import progress, stopping
from strategies.ranks import RankState


@dataclass(frozen=True)
class LocalResult:
    """What one client round of training did."""

    steps: int
    mean_loss: float
    released_counts: tuple[float, ...] | None = None  # under DP: the label counts the round released (noised)
    rank_state: RankState | None = None  # a self-pruning client's rank after the round (HetLoRA)


class LengthSorted(torch.utils.data.Sampler[list[int]]):
    """The batches of ``batches`` (index lists), each ordered by the examples' ``lengths``, shortest first.

    A batch cut into consecutive pieces (DP's physical batches, :class:`MicroBatches`) pads
    each piece to its longest text: on SST-2's training phrases (13 tokens on average) a
    random piece of 32 pads to about 35 tokens, a length-ordered one to about 15. A batch
    is a set (one mean gradient; under DP one clipped sum and one noise draw), so its
    order changes nothing the update or the accounting depends on.
    """

    def __init__(self, batches: Iterable[list[int]], lengths: Sequence[int]) -> None:
        self.batches, self.lengths = batches, lengths

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield sorted(batch, key=self.lengths.__getitem__)

    def __len__(self) -> int:
        return len(self.batches)


class MicroBatches:
    """Each batch of ``batches`` (lists of examples) as its length-ordered micro-batches of at most
    ``size`` examples, collated, for :func:`train_steps` to accumulate: the batch's mean gradient
    with less padding (each micro-batch pads to its own longest text)."""

    def __init__(self, batches: Iterable[list[dict[str, Any]]], *, size: int,
                 collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]) -> None:  # fmt: skip
        self.batches, self.size, self.collate = batches, size, collate

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        for batch in self.batches:
            rows = sorted(batch, key=lambda row: len(row["input_ids"]))
            yield [self.collate(rows[i : i + self.size]) for i in range(0, len(rows), self.size)]


@contextlib.contextmanager
def stop_checks(model: nn.Module) -> Iterator[None]:
    """While inside, a stopping simulation ends the client's step within one layer, not after its whole
    micro-batch: every block of the model's layer stacks (the children of each ``nn.ModuleList``) checks
    the stop file before its forward pass and, through a hook on its output, before its share of the
    backward pass. A SmolLM2 step on 2 CPU cores takes seconds; a block's share is a thirtieth of it. No
    hook outside a simulation (no stop file named: :mod:`fedlora.federation.stopping`)."""
    if not stopping.stop_file_named():
        yield
        return

    def check(*_: object) -> None:
        stopping.check_client()

    def on_output(module: nn.Module, args: object, output: object) -> None:
        first = output[0] if isinstance(output, tuple) else output
        if isinstance(first, torch.Tensor) and first.requires_grad:
            first.register_hook(check)

    blocks = [block for stack in model.modules() if isinstance(stack, nn.ModuleList) for block in stack]
    handles = [h for b in blocks for h in (b.register_forward_pre_hook(check), b.register_forward_hook(on_output))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def cycle(batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches: each pass re-iterates (a DataLoader reshuffles with its generator)."""
    while True:
        yield from batches


def train_steps(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    *,
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    device: torch.device,
    after_step: Callable[[], None] | None = None,
) -> LocalResult:
    """``steps`` optimizer steps on ``batches``; returns the mean training loss (over the batches seen).

    ``after_step`` runs after every optimizer step (e.g. to re-apply a rank mask). A DP
    optimizer under Opacus's ``BatchMemoryManager`` skips its step on every physical batch
    but a logical batch's last: only steps taken are counted, so ``steps`` are logical.
    A batch given as a list of micro-batches (:class:`MicroBatches`) is one step: each
    micro-batch's mean loss is weighted by its share of the batch's examples before its
    backward pass, so the gradients add up to the batch's mean gradient.
    """
    model.train()
    total, seen, taken = 0.0, 0, 0
    with stop_checks(model):
        while taken < steps:
            item = next(batches)
            parts = item if isinstance(item, list) else [item]
            examples = sum(len(part["input_ids"]) for part in parts)
            if not examples:  # an empty Poisson batch (DP-SGD): no forward pass, still a step
                zero_gradients(optimizer)
            loss = 0.0
            for part in parts:
                part = {k: v.to(device, non_blocking=True) for k, v in part.items()}
                piece = loss_fn(model, part)
                if len(parts) > 1:
                    share = len(part["input_ids"]) / examples
                    piece = piece * share
                piece.backward()  # (under DP with ghost clipping, Opacus's loss object: it runs both passes)
                loss += piece.item()
                stopping.check_client()  # also where a model has no layer stack
            optimizer.step()
            skipped = getattr(optimizer, "_is_last_step_skipped", False)  # Opacus's DPOptimizer, mid logical batch
            optimizer.zero_grad(set_to_none=True)
            if not skipped:
                taken += 1
                progress.report(taken, steps)
                if after_step is not None:
                    after_step()
            total += loss
            seen += 1 if examples else 0
    return LocalResult(steps=taken, mean_loss=total / max(seen, 1))


def zero_gradients(optimizer: torch.optim.Optimizer) -> None:
    """The gradients of an empty batch: zero per-example gradients for Opacus's DP optimizer (``grad_sample``,
    none of them; ghost clipping reads ``grad``), so that it still adds its noise to the zero clipped sum
    and steps, as DP-SGD's analysis assumes (a step skipped would tell the batch was empty)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad_sample = p.new_zeros((0, *p.shape))
            p.grad = torch.zeros_like(p)


def local_steps(cfg: TrainConfig, num_examples: int) -> int:
    """Optimizer steps of a client round: ``local_steps``, or ``local_epochs`` passes over its examples."""
    if cfg.local_steps is not None:
        return cfg.local_steps
    return cfg.local_epochs * math.ceil(num_examples / cfg.batch_size)


def round_lr(cfg: TrainConfig, server_round: int, rounds: int) -> float:
    """The clients' learning rate in ``server_round`` (1..``rounds``) by ``train.lr_schedule``.

    Warm-up: lr r / (warmup_rounds + 1) in rounds r <= ``warmup_rounds``. Then ``constant``
    keeps lr; ``cosine`` anneals from lr to ``min_lr`` over the remaining rounds (as
    FlowerTune does): min_lr + (lr - min_lr) (1 + cos(pi t)) / 2, t = 0 in the first
    round after warm-up and (n - 1) / n in the last of the n. Round 0 (an initialisation)
    uses lr.
    """
    lr = cfg.lr
    if server_round <= 0:
        return lr
    if server_round <= cfg.warmup_rounds:
        return lr * server_round / (cfg.warmup_rounds + 1)
    if cfg.lr_schedule == "cosine":
        n = max(1, rounds - cfg.warmup_rounds)
        t = (server_round - cfg.warmup_rounds - 1) / n
        return cfg.min_lr + (lr - cfg.min_lr) * (1 + math.cos(math.pi * t)) / 2
    return lr


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter], *, lr: float | None = None) -> torch.optim.Optimizer:
    """A fresh local optimizer for one round (``train.optimizer``), at ``lr`` (default ``train.lr``)."""
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
