"""Server optimisers (FedOpt): exact reduction to plain aggregation, and steps computed by hand in float64."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.lora import AdapterKey, Role
from strategies.server_opt import ServerOptConfig, ServerOptimizer

KEY = AdapterKey("m", Role.B)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def run(optimizer: str, targets: list[torch.Tensor], **settings) -> list[torch.Tensor]:
    """The states after stepping from x = [0, 0] towards each target in turn."""
    opt = ServerOptimizer(ServerOptConfig(optimizer=optimizer, **settings))
    state = {KEY: t(0.0, 0.0)}
    out = []
    for target in targets:
        state = opt.step(state, {KEY: target}, [KEY])
        out.append(state[KEY])
    return out


def test_none_returns_the_aggregate_itself_and_momentum_at_lr_1_without_momentum_too() -> None:
    g = torch.Generator().manual_seed(0)
    state = {KEY: torch.randn(5, 3, generator=g)}  # float32, as the models hold them
    target = {KEY: torch.randn(5, 3, generator=g), AdapterKey("head", Role.DENSE): torch.ones(2)}
    assert ServerOptimizer(ServerOptConfig()).step(state, target, [KEY]) is target
    plain = ServerOptimizer(ServerOptConfig(optimizer="momentum", lr=1.0, momentum=0.0)).step(state, target, [KEY])
    assert torch.equal(plain[KEY], target[KEY])  # x + (x* - x) is exact from float32 values in float64


def test_momentum_matches_a_hand_computation() -> None:
    # Delta_1 = [1, 2]: m = [1, 2], x = 0.5 m = [0.5, 1].
    # Delta_2 = [3, 3] - [0.5, 1] = [2.5, 2]: m = 0.9 [1, 2] + [2.5, 2] = [3.4, 3.8]; x = [0.5, 1] + 0.5 m.
    first, second = run("momentum", [t(1.0, 2.0), t(3.0, 3.0)], lr=0.5, momentum=0.9)
    torch.testing.assert_close(first, t(0.5, 1.0), rtol=0, atol=1e-15)
    torch.testing.assert_close(second, t(0.5 + 0.5 * 3.4, 1.0 + 0.5 * 3.8), rtol=0, atol=1e-15)


@pytest.mark.parametrize("optimizer", ["adam", "yogi", "adagrad"])
def test_adaptive_steps_match_a_hand_computation(optimizer: str) -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    first, second = run(optimizer, [t(1.0, -2.0), t(1.0, -2.0)], lr=lr, beta1=b1, beta2=b2, tau=tau)
    x, m, v = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    expected = []
    for target in ([1.0, -2.0], [1.0, -2.0]):
        for i in range(2):
            d = target[i] - x[i]
            m[i] = b1 * m[i] + (1 - b1) * d
            if optimizer == "adam":
                v[i] = b2 * v[i] + (1 - b2) * d * d
            elif optimizer == "yogi":
                v[i] = v[i] - (1 - b2) * d * d * math.copysign(1.0, v[i] - d * d)
            else:
                v[i] = v[i] + d * d
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
        expected.append(t(*x))
    torch.testing.assert_close(first, expected[0], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(second, expected[1], rtol=1e-13, atol=1e-15)


def test_momentum_moves_with_a_change_of_basis() -> None:
    """After B <- B T (FedSVD's refactorisation, with A <- T^-1 A), m T A' = m A: the same update."""
    g = torch.Generator().manual_seed(1)
    opt = ServerOptimizer(ServerOptConfig(optimizer="momentum"))
    b0, b1 = torch.zeros(6, 3, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    opt.step({KEY: b0}, {KEY: b1}, [KEY])
    a = torch.randn(3, 8, generator=g, dtype=torch.float64)
    basis = torch.randn(3, 3, generator=g, dtype=torch.float64)
    before = opt.m[KEY] @ a
    opt.rebase({KEY: basis})
    torch.testing.assert_close(opt.m[KEY] @ torch.linalg.solve(basis, a), before, rtol=1e-10, atol=1e-12)
    adam = ServerOptimizer(ServerOptConfig(optimizer="adam"))
    adam.step({KEY: b0}, {KEY: b1}, [KEY])
    with pytest.raises(ValueError, match="second moment"):
        adam.rebase({KEY: basis})


def test_moments_round_trip_through_a_checkpoint() -> None:
    opt = ServerOptimizer(ServerOptConfig(optimizer="adam"))
    opt.step({KEY: t(0.0, 0.0)}, {KEY: t(1.0, 2.0)}, [KEY])
    again = ServerOptimizer(ServerOptConfig(optimizer="adam"))
    again.load_state_tensors(opt.state_tensors())
    assert torch.equal(again.m[KEY], opt.m[KEY]) and torch.equal(again.v[KEY], opt.v[KEY])


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"optimizer": "sgd"}, "server.optimizer must be one of"), ({"lr": 0.0}, "server.lr"),
     ({"momentum": 1.0}, "server.momentum"), ({"tau": 0.0}, "server.tau")],
)  # fmt: skip
def test_bad_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerOptConfig(**settings)
