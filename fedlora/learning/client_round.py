"""One client round, with no Flower in it: load what the server sent, train the partition (plainly or
with DP-SGD), and return the payload the strategy sends.

What the round exchanges is :class:`~fedlora.federation.protocol.Protocol`'s (held by the
:class:`~fedlora.learning.adapted_model.AdaptedModel`); method-specific steps live with the method
(``fedlora.learning.gradient_init``, ``fedlora.federation.folding``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from fedlora import lora
from fedlora.config.run import RunConfig
from fedlora.federation.schedule import rounds_taken, scheduled
from fedlora.learning.adapted_model import AdaptedModel
from fedlora.learning.client_data import ClientData
from fedlora.learning.train import LocalResult, cycle, local_steps, make_optimizer, round_lr, train_steps
from fedlora.lora import AdapterKey, Tensors
from fedlora.privacy.accounting import ClientPlan, Step, make_plan
from fedlora.privacy.dp_sgd import dp_generator, dp_sgd
from fedlora.seeds import Stream, seed_of
from strategies import Strategy
from strategies.ranks import RankState, SelfPruning, prunes


def privacy_plan(cfg: RunConfig, strategy: Strategy, *, partition_id: int, num_examples: int) -> ClientPlan:
    """Client ``partition_id``'s DP-SGD plan over the rounds the schedule gives it (``privacy=dp``)."""
    init = strategy.gradient_init
    round_zero = scheduled(cfg, 0)  # the server splits the init's examples among them
    return make_plan(
        cfg.privacy,
        num_examples=num_examples,
        batch_size=cfg.train.batch_size,
        steps=local_steps(cfg.train, num_examples),
        rounds=rounds_taken(cfg, partition_id),
        init_release=init is not None and init.from_clients and partition_id in round_zero,
        init_share=math.ceil(init.samples / len(round_zero)) if init is not None else None,
        label_prior=bool(cfg.train.logit_adjustment),
    )


def train_round(
    cfg: RunConfig,
    data: ClientData,
    adapted: AdaptedModel,
    partition_id: int,
    received: Tensors,
    *,
    server_round: int,
    base: Tensors | None = None,
    history: list[Step] | None = None,
    plan: ClientPlan | None = None,
    personal: Tensors | None = None,
    own: RankState | None = None,
) -> tuple[Tensors, int | None, LocalResult]:
    """Load ``received`` (and base delta ``base``), train the partition; (payload, num_examples, result).

    With ``privacy=dp`` the round is DP-SGD by ``plan`` and ``history`` (the client's accountant
    history, kept by the caller between rounds) is extended by this round's steps; the caller
    checks the budget first (:meth:`ClientPlan.affords`). ``num_examples`` is then the sum of the
    round's noised label counts (None without logit adjustment), unless ``privacy.public_counts``
    declares the exact count public. ``personal``: the node's own kept tensors (FedSA-LoRA's B; see
    :meth:`AdaptedModel.personal`), missing on a client's first round. ``own``: a self-pruning client's rank
    state (HetLoRA's, from its node state); the result then holds the next one (``LocalResult.rank_state``).
    """
    protocol, params, strategy = adapted.protocol, adapted.params, adapted.protocol.strategy
    examples = data.tokenised(partition_id)
    adapted.set_base(base or {})
    adapted.load(protocol.start(partition_id, received, server_round=server_round, personal=personal))
    pruning = strategy if prunes(strategy) else None
    mask = protocol.rank_mask(partition_id, own=own.rank if own is not None and pruning else None)
    mask.apply(params)
    trainable = protocol.trained_in(server_round)
    lora.set_trainable(params, trainable)
    seed = seed_of(Stream.LOCAL_BATCHES, cfg.seed, server_round=server_round, client=partition_id)
    private = cfg.privacy.enabled  # DP-SGD cuts its Poisson batches itself (privacy.max_physical_batch_size)
    batches = data.shuffled(examples, seed=seed, micro=not private)
    lr = round_lr(cfg.train, server_round, cfg.rounds)
    optimizer = make_optimizer(cfg.train, [params[k] for k in sorted(trainable)], lr=lr)
    train = partial(
        train_steps,
        steps=local_steps(cfg.train, len(examples)),
        device=adapted.device,
        after_step=partial(_after_step, mask, params, pruning, lr=lr),
    )
    with torch.autocast(adapted.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
        if private:
            if history is None or plan is None:
                raise ValueError("privacy=dp needs the client's plan and accountant history")
            result, noised_count = _private_steps(
                cfg, data, adapted, train, optimizer, batches, partition_id, server_round=server_round, plan=plan
            )
            history.extend(plan.round_steps)
        else:
            loss_fn = _loss(data, None, data.label_offset(partition_id))
            result, noised_count = train(adapted.model, cycle(batches), loss_fn=loss_fn, optimizer=optimizer), None
    trained = lora.read({k: params[k] for k in trainable})  # copy only what was trained
    if pruning is not None:  # prune the tail if it shrank since this client's last round: sent at its new rank
        state = pruning.next_state(trained, mask.rank, own)
        mask = protocol.rank_mask(partition_id, own=state.rank)
        result = dataclasses.replace(result, rank_state=state)
    exact = not private or cfg.privacy.public_counts
    return strategy.payload(mask.view(trained)), len(examples) if exact else noised_count, result


def _private_steps(
    cfg: RunConfig,
    data: ClientData,
    adapted: AdaptedModel,
    train: Callable[..., LocalResult],
    optimizer: torch.optim.Optimizer,
    batches: Any,
    partition_id: int,
    *,
    server_round: int,
    plan: ClientPlan,
) -> tuple[LocalResult, int | None]:
    """The round's DP-SGD steps (Opacus) with the noised label prior; (result, noised example count)."""
    privacy = cfg.privacy
    unsafe_seed = seed_of(Stream.UNSAFE_DP, cfg.seed, server_round=server_round, client=partition_id)
    g = dp_generator(privacy, unsafe_seed)
    counts, noised_count = data.noised_prior(partition_id, g)  # charged with the round
    offset = None if counts is None else data.task.prior_offset(counts, tau=cfg.train.logit_adjustment)
    with dp_sgd(
        adapted.model,
        optimizer,
        batches,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        grad_sample_mode=privacy.grad_sample_mode,
        criterion=data.task.criterion(),
        generator=g,
        max_physical_batch_size=privacy.max_physical_batch_size or cfg.train.micro_batch_size,
        lengths=data.lengths(partition_id),
    ) as (model, dp_optimizer, loader, criterion):
        result = train(model, cycle(loader), loss_fn=_loss(data, criterion, offset), optimizer=dp_optimizer)
    if counts is not None:
        result = dataclasses.replace(result, released_counts=tuple(counts.tolist()))
    return result, noised_count


def _after_step(
    mask: lora.RankMask, params: Mapping[AdapterKey, torch.nn.Parameter], pruning: SelfPruning | None, *, lr: float
) -> None:
    """After each optimiser step: the rank mask again (DP noise fills masked directions), then a self-pruning
    strategy's decoupled step on its tail penalty (it reads no example: under DP, post-processing)."""
    mask.apply(params)
    if pruning is not None:
        pruning.penalty_step(params, mask.rank, lr=lr)


def _loss(data: ClientData, criterion: torch.nn.Module | None, offset: torch.Tensor | None) -> Callable[..., Any]:
    """The task's training loss, with the label offset when there is one (causal LMs take none)."""
    loss = partial(data.task.loss, criterion=criterion)
    return loss if offset is None else partial(loss, offset=offset)
