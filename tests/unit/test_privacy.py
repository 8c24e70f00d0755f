"""DP-SGD on a client: noise and clipping applied, no silent corruption, calibration, delta, bad input."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedlora import lora
from fedlora.config.run import ConfigError, PrivacyConfig
from fedlora.federation.schedule import scheduled
from fedlora.learning import gradient_init
from fedlora.learning.classification import SequenceClassification
from fedlora.learning.train import LengthSorted, cycle, train_steps
from fedlora.learning.worker import Worker
from fedlora.privacy.accounting import ClientPlan, calibrate, client_delta, compress, epsilon, make_plan
from fedlora.privacy.dp_sgd import clip_and_noise, dp_sgd

TASK = SequenceClassification()


def round_from_start(worker: Worker, history: list | None = None) -> dict:
    start = worker.adapted.protocol.download(worker.adapted.initial_state())
    payload, _, _ = worker.train_round(3, start, server_round=1, history=history)
    return payload


def local_round(worker: Worker, *, dp: bool) -> dict:
    """Two AdamW steps on client 3's first fixed batches, plain or through Opacus with fixed (non-Poisson)
    batches, no noise and a clipping bound no gradient reaches."""
    lora.set_trainable(worker.adapted.params, worker.adapted.protocol.trainable)
    lora.write(worker.adapted.params, worker.adapted.initial_state())
    params = [worker.adapted.params[k] for k in sorted(worker.adapted.protocol.trainable)]
    optimizer = torch.optim.AdamW(params, lr=0.01)
    batches = worker.data.shuffled(worker.data.tokenised(3), seed=7)
    run = partial(train_steps, steps=2, device=worker.device)
    if not dp:
        run(worker.adapted.model, cycle(batches), loss_fn=TASK.loss, optimizer=optimizer)
    else:
        with dp_sgd(
            worker.adapted.model,
            optimizer,
            batches,
            noise_multiplier=0.0,
            max_grad_norm=1e6,
            grad_sample_mode="hooks",
            criterion=TASK.criterion(),
            generator=torch.Generator().manual_seed(0),
            poisson=False,  # the same batches as the plain round
        ) as (model, dp_optimizer, loader, criterion):
            run(model, cycle(loader), loss_fn=partial(TASK.loss, criterion=criterion), optimizer=dp_optimizer)
    return {k: worker.adapted.params[k].detach().clone() for k in worker.adapted.protocol.trainable}


def test_without_noise_or_reachable_clipping_dp_sgd_equals_plain_training(make_config) -> None:
    """Guards against Opacus corrupting LoRA updates silently (Opacus issue 820): same batches, same update.

    16 examples per client in batches of 8: Opacus's expected batch size (n / number of
    batches) is then the real one, so its mean equals the plain loss's mean.
    """
    cfg = make_config("data.synthetic_train=160")
    plain = local_round(Worker(cfg, num_partitions=10), dp=False)
    private = local_round(Worker(cfg, num_partitions=10), dp=True)
    assert private.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(private[key], plain[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_dp_sgd_adds_noise_and_charges_the_ledger(make_config, mode: str) -> None:
    plain = round_from_start(Worker(make_config("train.lr=0.01"), num_partitions=10))
    dp = make_config("train.lr=0.01", "privacy=dp", "privacy.noise_multiplier=1.0", f"privacy.grad_sample_mode={mode}")
    worker = Worker(dp, num_partitions=10)
    history: list = []
    private = round_from_start(worker, history)
    assert any(not torch.allclose(private[k], plain[k], atol=1e-4) for k in plain)
    plan = worker.privacy_plan(3)
    assert history == plan.round_steps  # the DP-SGD steps, then the noised label counts (logit adjustment)
    assert history[1] == (dp.privacy.label_noise, 1.0, 1)
    assert all(not hasattr(p, "grad_sample") for p in worker.adapted.model.parameters())  # Opacus is gone afterwards


def test_per_sample_gradients_are_clipped(make_config) -> None:
    """One plain-SGD step (lr 1) without noise moves the trainable tensors by the mean clipped
    gradient: its norm is at most C, though the raw gradients are far larger."""
    worker = Worker(make_config(), num_partitions=10)
    model, c = worker.adapted.model, 1e-3
    lora.set_trainable(worker.adapted.params, worker.adapted.protocol.trainable)
    trainable = [worker.adapted.params[k] for k in sorted(worker.adapted.protocol.trainable)]
    before = [p.detach().clone() for p in trainable]
    batches = worker.data.shuffled(worker.data.tokenised(0), seed=1)
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    with dp_sgd(
        model,
        optimizer,
        batches,
        noise_multiplier=0.0,
        max_grad_norm=c,
        grad_sample_mode="hooks",
        criterion=TASK.criterion(),
        generator=torch.Generator().manual_seed(0),
        poisson=False,
    ) as (private, dp_optimizer, loader, criterion):
        batch = next(iter(loader))
        TASK.loss(private, batch, criterion).backward()
        dp_optimizer.step()
    moved = torch.sqrt(sum((p.detach() - b).square().sum() for p, b in zip(trainable, before, strict=True)))
    assert 0 < float(moved) <= c * (1 + 1e-4)
    model.zero_grad()
    TASK.loss(model, next(iter(batches))).backward()
    assert float(torch.sqrt(sum(p.grad.square().sum() for p in trainable))) > 100 * c


def test_clip_and_noise_clips_each_example_then_adds_noise() -> None:
    grads = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.3, 0.4])}]  # norms 5 and 0.5
    zeros = {"w": torch.zeros(2)}
    total, n = clip_and_noise(iter(grads), zeros, max_grad_norm=1.0, noise_multiplier=0.0, generator=torch.Generator())
    torch.testing.assert_close(total["w"], torch.tensor([0.6 + 0.3, 0.8 + 0.4]))
    assert n == 2
    noisy, _ = clip_and_noise(
        iter(grads), zeros, max_grad_norm=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.allclose(noisy["w"], total["w"])
    empty, n = clip_and_noise(iter([]), zeros, max_grad_norm=1.0, noise_multiplier=1.0, generator=torch.Generator())
    assert n == 0 and empty["w"].shape == (2,) and empty["w"].abs().sum() > 0  # an empty subsample is noised too


@pytest.mark.parametrize(
    ("target", "rate", "steps", "rounds", "init"),
    [(1.0, 0.01, 50, 10, False), (4.0, 0.1, 10, 3, False), (2.0, 1 / 7, 10, 2, True), (8.0, 0.05, 20, 1, False)],
)
def test_calibrated_noise_meets_the_target_by_opacus_own_accountant(target, rate, steps, rounds, init) -> None:
    plan = ClientPlan(0.0, rate, steps, rounds, delta=1e-5, budget=target, init_release=init)
    sigma = calibrate(plan, target)
    acct = RDPAccountant()  # Opacus's default orders, including fractional ones
    acct.history = compress(plan.planned(sigma))
    spent = acct.get_epsilon(delta=1e-5)
    assert 0.9 * target <= spent <= target
    assert epsilon(plan.planned(sigma), 1e-5) <= target  # the (integer-order) bound the budget uses


def test_prv_calibration_meets_the_target() -> None:
    plan = ClientPlan(0.0, 0.1, 10, 3, delta=1e-5, budget=4.0, init_release=False, accountant="prv")
    sigma = calibrate(plan, 4.0)
    acct = PRVAccountant()
    acct.history = compress(plan.planned(sigma))
    assert 0.9 * 4.0 <= acct.get_epsilon(delta=1e-5) <= 4.0 + 0.05  # PRV's own eps_error is 0.01


def test_delta_defaults_well_below_one_over_n_and_refuses_more() -> None:
    cfg = PrivacyConfig(name="dp", epsilon=1.0)
    assert client_delta(cfg, 1000) == 1e-5 and client_delta(cfg, 50) == 1e-5
    assert client_delta(cfg, 10**6) == pytest.approx(1e-7)
    with pytest.raises(ConfigError, match="not below 1/n = 1/50"):
        client_delta(PrivacyConfig(name="dp", epsilon=1.0, delta=0.02), 50)


def test_a_noise_multiplier_too_small_for_one_round_is_refused() -> None:
    cfg = PrivacyConfig(name="dp", epsilon=0.5, noise_multiplier=0.3)
    with pytest.raises(ConfigError, match=r"cannot keep a client with 100 examples within privacy\.epsilon=0\.5"):
        make_plan(cfg, num_examples=100, batch_size=16, steps=10, rounds=3, init_release=False)


def test_a_client_refuses_the_round_that_would_exceed_its_budget() -> None:
    plan = make_plan(
        PrivacyConfig(name="dp", epsilon=3.0), num_examples=200, batch_size=16, steps=10, rounds=2, init_release=False
    )
    history: list = []
    for _ in range(plan.rounds):
        assert plan.affords(history, plan.round_step)
        history.append(plan.round_step)
    assert plan.spent(history) <= 3.0
    assert not plan.affords(history, plan.round_step)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy=dp"], "privacy=dp needs privacy.epsilon (a budget) or privacy.noise_multiplier"),
        (["privacy=dp", "privacy.epsilon=0"], "privacy.epsilon must be > 0"),
        (["privacy=dp", "privacy.epsilon=1", "privacy.delta=1.5"], "privacy.delta must be in (0, 1)"),
        (["privacy=dp", "privacy.epsilon=1", "privacy.max_grad_norm=0"], "privacy.max_grad_norm must be > 0"),
        (["privacy=dp", "privacy.epsilon=1", "privacy.grad_sample_mode=ew"], "privacy.grad_sample_mode must be one of"),
        (["privacy=dp", "privacy.epsilon=1", "privacy.accountant=gdp"], "privacy.accountant must be one of"),
        (["privacy=dp", "privacy.epsilon=1", "privacy.poisson=false"], "privacy.poisson=false is refused under"),
        (
            ["privacy=dp", "privacy.epsilon=1", "strategy.weighting=examples", "train.logit_adjustment=0"],
            "strategy.weighting=examples under privacy=dp needs a protected count",
        ),
    ],
)
def test_bad_privacy_input_is_one_clear_config_error(make_config, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(*overrides)
    assert message in str(info.value)


def test_a_logical_batch_is_the_sum_of_its_physical_batches_and_one_accountant_step(make_config) -> None:
    """Batches of 16 cut into physical batches of 4 (Opacus's BatchMemoryManager), in the loader's order
    or ordered by length first, give the update of one batch of 16 with the noise off; the optimizer
    steps, and the ledger counts, logical batches."""

    def round_with(physical: int | None, by_length: bool = False) -> tuple[dict, int]:
        worker = Worker(make_config("data.synthetic_train=320", "train.batch_size=16"), num_partitions=10)
        for module in worker.adapted.model.modules():  # dropout draws per physical batch: the batches must see the same
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        lora.set_trainable(worker.adapted.params, worker.adapted.protocol.trainable)
        params = [worker.adapted.params[k] for k in sorted(worker.adapted.protocol.trainable)]
        optimizer = torch.optim.SGD(params, lr=0.5)
        with dp_sgd(
            worker.adapted.model, optimizer, worker.data.shuffled(worker.data.tokenised(3), seed=7),
            noise_multiplier=0.0,
            max_grad_norm=0.05, grad_sample_mode="hooks", criterion=TASK.criterion(),
            generator=torch.Generator().manual_seed(0), poisson=False, max_physical_batch_size=physical,
            lengths=worker.data.lengths(3) if by_length else None,
        ) as (model, dp_optimizer, loader, criterion):  # fmt: skip
            result = train_steps(
                model, cycle(loader), loss_fn=partial(TASK.loss, criterion=criterion), optimizer=dp_optimizer,
                steps=2, device=worker.device,
            )  # fmt: skip
        return {k: worker.adapted.params[k].detach().clone() for k in worker.adapted.protocol.trainable}, result.steps

    whole, steps_whole = round_with(None)
    split, steps_split = round_with(4)
    by_length, steps_by_length = round_with(4, by_length=True)
    assert steps_whole == steps_split == steps_by_length == 2  # logical steps, though 8 physical batches
    start = Worker(make_config("data.synthetic_train=320"), num_partitions=10).adapted.initial_state()
    moved = math.sqrt(sum(float((whole[k] - start[k]).square().sum()) for k in whole))
    for other in (split, by_length):
        differ = math.sqrt(sum(float((other[k] - whole[k]).square().sum()) for k in whole))
        assert moved > 0 and differ < 1e-3 * moved  # float32 summation order only


def test_length_sorted_batches_keep_each_logical_batch_and_order_it_by_length() -> None:
    lengths = [5, 1, 9, 3, 7, 2]
    batches = [[0, 2, 4], [], [5, 1, 3, 0]]
    sorted_batches = list(LengthSorted(batches, lengths))
    assert [sorted(b) for b in sorted_batches] == [sorted(b) for b in batches]
    assert sorted_batches == [[0, 4, 2], [], [1, 5, 3, 0]]


def test_a_dp_round_charges_one_accountant_step_per_logical_batch(make_config) -> None:
    cfg = make_config("privacy=dp", "privacy.noise_multiplier=1.0", "privacy.max_physical_batch_size=3")
    worker = Worker(cfg, num_partitions=10)
    history: list = []
    start = worker.adapted.protocol.download(worker.adapted.initial_state())
    _, _, result = worker.train_round(3, start, server_round=1, history=history)
    plan = worker.privacy_plan(3)
    assert result.steps == cfg.train.local_steps
    assert history == [(plan.noise_multiplier, plan.sample_rate, 2), (cfg.privacy.label_noise, 1.0, 1)]  # + prior


def test_fed_sb_s_init_release_is_charged_at_its_poisson_rate(make_config) -> None:
    """The init gradient sums a Poisson subsample (each record in with probability share / n): a sampled
    Gaussian mechanism, charged at that rate, planned so, and at the rate of what the server really asks."""
    cfg = make_config("strategy=fed_sb", "privacy=dp", "privacy.epsilon=8", "data.synthetic_train=320",
                      "strategy.init_samples=6")  # fmt: skip
    worker = Worker(cfg, num_partitions=cfg.clients)
    round_zero = scheduled(cfg, 0)
    pid, share = round_zero[0], math.ceil(6 / len(round_zero))
    plan, n = worker.privacy_plan(pid), len(worker.data.rows(pid))
    assert plan.init_release and plan.init_rate == pytest.approx(share / n) and 0 < share / n < 1
    assert plan.planned()[0] == plan.init_step == (plan.noise_multiplier, share / n, 1)
    assert plan.spent([plan.init_step]) < plan.spent([plan.init_step_at(1.0)])  # amplification by subsampling
    for asked, rate in ((share, share / n), (10 * n, 1.0)):  # what the server asks is what the client charges
        history: list = []
        gradient_init.client_share(worker, pid, num_examples=asked, history=history)
        assert history == [(plan.noise_multiplier, pytest.approx(rate), 1)]


def test_the_noise_verdict_is_printed_only_when_it_holds() -> None:
    """The header said "well above 1, few steps learn nothing" for a run that reached 1.000, whatever the ratio:
    a per-step ratio of 8.8 over 100 steps averages to 0.88, under the signal."""
    from fedlora.outputs.console import noise_verdict

    assert noise_verdict(8.8, 100, "steps") == ""
    assert noise_verdict(0.45, 10, "rounds") == ""
    assert (
        noise_verdict(8.8, 16, "steps") == "; over the run's 16 steps still 2.2 (> 1): the noise outweighs the signal"
    )
