"""User-level DP-FedAvg (privacy=user): clipping, calibrated noise, reduction to FedAvg, adaptive clipping,
the accountant against Opacus's, Poisson cohorts, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.cli import main
from fedlora.config.compose import compose
from fedlora.config.federated import PrivacyConfig
from fedlora.config.run import ConfigError
from fedlora.privacy.accounting import user_plan
from fedlora.privacy.user_level import UserLevelDP
from strategies import user_dp
from tests.helpers import make, random_adapter, server_step


def updates(n: int, *, seed: int = 0, scale: float = 1.0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{k: scale * v for k, v in random_adapter(g).items()} for _ in range(n)]


def test_a_clipped_update_never_exceeds_the_bound() -> None:
    for i, update in enumerate(updates(50, scale=0.05)):  # norms from below to far above the bound
        bound = 0.1 * (i + 1) / 10
        clipped, size = user_dp.clip(update, bound)
        assert user_dp.norm(clipped) <= bound * (1 + 1e-12)
        if size <= bound:
            assert all(torch.equal(clipped[k], update[k]) for k in update)  # below the bound: untouched
    # In the noisy mean (noise off, one client, m = 1) the one client's contribution is at most C.
    big = updates(1, scale=100.0)
    mean, norms = user_dp.noisy_mean(big, big[0], bound=0.3, noise_std=0.0, expected=1,
                                     generator=torch.Generator())  # fmt: skip
    assert norms[0] > 0.3 and user_dp.norm(mean) == pytest.approx(0.3, rel=1e-12)


def test_the_noise_has_the_calibrated_standard_deviation() -> None:
    """Zero updates: m x (noisy mean) is the noise itself; over 200k draws its std is sigma C within 1%
    (the sample std of n normals has relative sd 1 / sqrt(2n) = 0.16%), its mean 0."""
    like = {k: torch.zeros(400, 500, dtype=torch.float64) for k in list(random_adapter(torch.Generator()))[:1]}
    sigma, bound, m = 1.3, 0.25, 40.0
    mean, _ = user_dp.noisy_mean([], like, bound=bound, noise_std=sigma * bound, expected=m,
                                 generator=torch.Generator().manual_seed(1))  # fmt: skip
    noise = next(iter(mean.values())) * m
    assert float(noise.std()) == pytest.approx(sigma * bound, rel=0.01)
    assert abs(float(noise.mean())) < 5 * sigma * bound / math.sqrt(noise.numel())


def test_without_noise_and_with_a_huge_clip_it_is_the_plain_uniform_average() -> None:
    """Every sampled client replies and m equals their number: state + mean(Delta_k) = mean(payload_k)."""
    g = torch.Generator().manual_seed(3)
    state = random_adapter(g)
    payloads = [{k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}
                for _ in range(4)]  # fmt: skip
    fedavg = make("fedavg")
    plain = server_step(fedavg, state, payloads, fedavg.weights([1, 1, 1, 1]))
    mean, _ = user_dp.noisy_mean([user_dp.update_of(p, state) for p in payloads], state, bound=1e9,
                                 noise_std=0.0, expected=4, generator=torch.Generator())  # fmt: skip
    private = server_step(fedavg, state, [user_dp.apply(state, mean)], fedavg.weights([1]))
    for key in plain:
        torch.testing.assert_close(private[key], plain[key], rtol=0, atol=1e-12)


def test_adaptive_clipping_converges_to_the_target_quantile() -> None:
    """Synthetic log-normal norms (median 2.0, 90% quantile 2.0 e^{1.28 x 0.5} = 3.79): from C = 0.1 the
    geometric update with a noisy count settles within 10% of the quantile it targets."""
    for quantile, expected_bound in ((0.5, 2.0), (0.9, 2.0 * math.exp(1.2816 * 0.5))):
        g = torch.Generator().manual_seed(7)
        clip = user_dp.AdaptiveClip(bound=0.1, quantile=quantile, lr=0.2, count_stddev=100 / 20)
        bounds = []
        for _ in range(600):
            norms = (2.0 * torch.exp(0.5 * torch.randn(100, generator=g, dtype=torch.float64))).tolist()
            clip.step(norms, expected=100, generator=g)
            bounds.append(clip.bound)
        settled = sum(bounds[-200:]) / 200
        assert settled == pytest.approx(expected_bound, rel=0.10)


def test_the_noise_split_leaves_the_combined_multiplier() -> None:
    z, sigma_b = 0.9, 2.5
    z_update = user_dp.update_noise_multiplier(z, sigma_b)
    assert z_update**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)
    assert z_update > z
    assert user_dp.update_noise_multiplier(z, None) == z  # no count released: all of z is the update's
    with pytest.raises(ValueError, match="must exceed z/2"):
        user_dp.update_noise_multiplier(z, 0.4)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_accountant_is_opacus_own(accountant: str) -> None:
    """For the same (q, sigma, rounds) the plan's epsilon is what Opacus's accountant says; the calibrated
    sigma spends at most the budget, and 1% less noise would spend more."""
    from opacus.accountants import create_accountant

    cfg = PrivacyConfig(name="user", epsilon=4.0, delta=1e-5, accountant=accountant)
    plan = user_plan(cfg, clients=1000, expected=50, rounds=40)
    acct = create_accountant(mechanism=accountant)
    for _ in range(40):
        acct.step(noise_multiplier=plan.noise_multiplier, sample_rate=0.05)
    theirs = acct.get_epsilon(delta=1e-5)
    assert plan.spent(plan.planned()) == pytest.approx(theirs, rel=1e-9 if accountant == "rdp" else 1e-3)
    assert theirs <= 4.0
    less = PrivacyConfig(name="user", noise_multiplier=plan.noise_multiplier * 0.99, delta=1e-5, accountant=accountant)
    lower = user_plan(less, clients=1000, expected=50, rounds=40)
    assert lower.spent(lower.planned()) > 4.0


def test_training_stops_before_the_budget_is_exceeded() -> None:
    """sigma 2 at q = 0.1 spends 0.650 in 3 rounds and 0.699 in 4 (delta 1e-5): a budget of 0.68 affords
    3 of the 10 planned rounds; the 4th is refused and no spend goes above epsilon."""
    cfg, _ = compose(["model=tiny", "privacy=user", "clients=100", "clients_per_round=10", "rounds=10",
                      "privacy.noise_multiplier=2.0", "privacy.epsilon=0.68"])  # fmt: skip
    dp = UserLevelDP(cfg)
    done = 0
    while dp.affords_round():
        dp.charge()
        done += 1
        assert dp.spent <= 0.68
    assert done == 3
    assert dp.plan.spent([(2.0, 0.1, 4)]) > 0.68


def test_a_resume_with_more_rounds_keeps_the_noise_its_past_rounds_ran_with() -> None:
    """The ledger holds what was released. A run planned for 5 rounds spends its budget in them; resumed with
    rounds=20 it calibrates a larger z, yet its past stays at the smaller one, so no round is afforded (charging
    the past at the new z would have claimed budget left and exceeded epsilon)."""
    base = ["model=tiny", "privacy=user", "privacy.epsilon=4", "clients=100", "clients_per_round=10"]
    first = UserLevelDP(compose([*base, "rounds=5"])[0])
    for _ in range(5):
        first.charge()
    resumed = UserLevelDP(compose([*base, "rounds=20"])[0])
    resumed.restore(first.state())
    assert resumed.plan.noise_multiplier > first.plan.noise_multiplier
    assert resumed.ledger == [(first.plan.noise_multiplier, 0.1, 5)]
    assert resumed.spent == first.spent <= 4.0
    assert resumed.plan.spent([(resumed.plan.noise_multiplier, 0.1, 5)]) < 3.0  # what the old record claimed
    assert not resumed.affords_round()


def test_cohorts_are_poisson_and_private() -> None:
    """Each client in with probability q; two servers with the same seed draw different cohorts (private
    randomness), the unsafe switch makes them repeat."""
    base = ["model=tiny", "privacy=user", "privacy.epsilon=8", "clients=200", "clients_per_round=20"]
    cfg, _ = compose(base)
    dp = UserLevelDP(cfg)
    sizes = [len(dp.cohort(200, r)) for r in range(1, 301)]
    assert sum(sizes) / len(sizes) == pytest.approx(20, rel=0.05)
    assert len(set(sizes)) > 5  # not a fixed-size sample
    other = UserLevelDP(cfg)
    assert [dp.cohort(200, r) for r in (1, 2, 3)] != [other.cohort(200, r) for r in (1, 2, 3)]
    unsafe, _ = compose([*base, "privacy.unsafe_seeded_randomness=true"])
    assert UserLevelDP(unsafe).cohort(200, 5) == UserLevelDP(unsafe).cohort(200, 5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=flora"], "privacy=user is refused for strategy=flora"),
        (["strategy=fedex"], "privacy=user is refused for strategy=fedex"),
        (["strategy=lora_fair"], "privacy=user is refused for strategy=lora_fair"),
        (["strategy=fed_sb"], "needs strategy.init_source=<a public calibration file>"),
        (["server.aggregation=median"], "server.aggregation=median is refused under privacy=user"),
        (["strategy.weighting=examples"], "strategy.weighting=examples is refused under privacy=user"),
        (["privacy.max_grad_norm=2"], "privacy.max_grad_norm has no effect under privacy=user"),
        (["privacy.clip_count_stddev=0.01"], "must exceed z/2"),
        (["privacy.delta=0.2"], "is not below 1/N"),
    ],
)
def test_refused_combinations_exit_2_with_one_line(capsys, overrides: list[str], message: str) -> None:
    assert main(["simulate", "--dry-run", "model=tiny", "privacy=user", "privacy.epsilon=8", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and message in err, err


def test_user_level_keys_are_refused_under_sample_level_dp() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.clip_norm has no effect under privacy=dp"):
        compose(["privacy=dp", "privacy.epsilon=8", "privacy.clip_norm=1"])


def test_a_user_level_sweep_runs_its_private_cells_with_privacy_user() -> None:
    from fedlora.commands.sweep import grid

    private, plain = grid(["fedavg"], [4.0, math.inf], [0], level="user")
    assert private.overrides() == ["strategy=fedavg", "seed=0", "privacy=user", "privacy.epsilon=4"]
    assert plain.overrides()[-1] == "privacy=none"
    with pytest.raises(ConfigError, match="unknown privacy level"):
        grid(["fedavg"], [4.0], [0], level="client")
