"""Aggregation math on random float64 tensors: properties of every strategy, then FedAvg's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.lora import AdapterKey, Role
from strategies import STRATEGIES, get_strategy_class
from strategies.base import normalise, weighted_mean
from strategies.fedavg import FedAvg
from tests.helpers import MODULES, make, random_adapter, server_step


def client_payloads(strategy, k: int, seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    state = strategy.initial_state(random_adapter(g, with_r=Role.R in strategy.adapter_roles), generator=g)
    payloads = []
    for _ in range(k):
        trained = {key: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for key, v in state.items()}
        payloads.append(strategy.payload({key: v for key, v in trained.items() if strategy.trainable(key)}))
    return state, payloads


def test_registry_config_files_and_classes_agree() -> None:
    conf = Path(__file__).resolve().parents[2] / "conf" / "strategy"
    assert {p.stem for p in conf.glob("*.yaml")} == set(STRATEGIES)
    for name, cls in STRATEGIES.items():
        assert cls.name == name
        assert cls.config_class(name=name).name == name


def test_unknown_strategy_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown strategy 'fedsdv'; choose from \['fed_sb', 'fedavg'"):
        get_strategy_class("fedsdv")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_client_order_does_not_matter(name: str) -> None:
    s = make(name)
    state, payloads = client_payloads(s, 4)
    weights = [3, 1, 7, 2]
    forward = model_after(s, state, payloads, s.weights(weights))
    backward = model_after(s, state, payloads[::-1], s.weights(weights[::-1]))
    for key in forward:
        torch.testing.assert_close(forward[key], backward[key], rtol=1e-10, atol=1e-12)


def updates(strategy, state: dict) -> dict:
    """The model a state stands for: s * B A per module (from the standard-LoRA export) and dense tensors.

    Strategies may re-parameterise (FedSVD refactorises B and A), so properties are stated on this.
    """
    lora = strategy.export(state)
    out = {k: v for k, v in lora.items() if k.role is Role.DENSE}
    for key in (k for k in lora if k.role is Role.B):
        out[key] = strategy.scaling * lora[key] @ lora[AdapterKey(key.module, Role.A, key.param)]
    return out


def model_after(strategy, state: dict, payloads: list[dict], p: torch.Tensor) -> dict:
    """The global model after a round: the new state's updates plus what the strategy folds into W0."""
    new = server_step(strategy, state, payloads, p)
    out = updates(strategy, new)
    factors = strategy.fold(new, payloads, p)
    for key in (k for k in factors if k.role is Role.B):
        out[key] = out[key] + strategy.scaling * factors[key] @ factors[AdapterKey(key.module, Role.A, key.param)]
    return out


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_one_client_returns_its_own_model(name: str) -> None:
    s = make(name)
    state, (payload,) = client_payloads(s, 1)
    expected = updates(s, {**state, **payload})
    got = model_after(s, state, [payload], s.weights([17]))
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_identical_clients_leave_the_state_unchanged(name: str) -> None:
    s = make(name)
    g = torch.Generator().manual_seed(5)
    state = s.initial_state(random_adapter(g, with_r=Role.R in s.adapter_roles), generator=g)
    same = s.payload({k: v for k, v in state.items() if s.trainable(k)})
    before, after = updates(s, state), model_after(s, state, [same, same, same], s.weights([1, 2, 3]))
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_payload_holds_only_trainable_tensors(name: str) -> None:
    s = make(name)
    _, (payload,) = client_payloads(s, 1)
    assert payload and all(s.trainable(k) for k in payload)


def test_fedavg_is_the_example_weighted_mean_of_each_factor() -> None:
    s = make("fedavg")
    key = AdapterKey("m", Role.A)
    payloads = [
        {key: torch.full((2, 2), 1.0, dtype=torch.float64)},
        {key: torch.full((2, 2), 5.0, dtype=torch.float64)},
    ]
    new = s.aggregate({}, payloads, s.weights([1, 3]))
    # p = (1/4, 3/4): 1 * 1/4 + 5 * 3/4 = 4
    torch.testing.assert_close(new[key], torch.full((2, 2), 4.0, dtype=torch.float64))


def test_uniform_weighting_ignores_example_counts() -> None:
    s = make("fedavg", weighting="uniform")
    key = AdapterKey("m", Role.B)
    payloads = [{key: torch.tensor([1.0], dtype=torch.float64)}, {key: torch.tensor([5.0], dtype=torch.float64)}]
    torch.testing.assert_close(
        s.aggregate({}, payloads, s.weights([1, 3]))[key], torch.tensor([3.0], dtype=torch.float64)
    )


def test_fedavg_is_inexact_for_the_product_and_its_error_is_the_covariance() -> None:
    """sum p_k B_k A_k - B_bar A_bar = sum p_k (B_k - B_bar)(A_k - A_bar), non-zero in general."""
    s = make("fedavg")
    state, payloads = client_payloads(s, 3, seed=2)
    p = s.weights([5, 2, 9])
    new = server_step(s, state, payloads, p)
    a, b = AdapterKey(MODULES[0], Role.A), AdapterKey(MODULES[0], Role.B)
    exact = sum(pk * (pl[b] @ pl[a]) for pk, pl in zip(p, payloads, strict=True))
    error = exact - new[b] @ new[a]
    covariance = sum(pk * (pl[b] - new[b]) @ (pl[a] - new[a]) for pk, pl in zip(p, payloads, strict=True))
    torch.testing.assert_close(error, covariance, rtol=1e-10, atol=1e-12)
    assert error.norm() > 1e-3


def test_payloads_with_different_tensors_are_refused() -> None:
    s = make("fedavg")
    k1, k2 = AdapterKey("m", Role.A), AdapterKey("m", Role.B)
    with pytest.raises(ValueError, match="other tensors"):
        s.aggregate({}, [{k1: torch.zeros(1)}, {k2: torch.zeros(1)}], s.weights([1, 1]))


def test_normalise_and_weighted_mean() -> None:
    torch.testing.assert_close(normalise([1, 3]), torch.tensor([0.25, 0.75], dtype=torch.float64))
    for bad in ([], [0, 0], [1, -1]):
        with pytest.raises(ValueError):
            normalise(bad)
    t = [torch.tensor([2.0]), torch.tensor([4.0])]
    out = weighted_mean(t, normalise([1, 1]))
    assert out.dtype == torch.float32 and out.item() == 3.0


def test_fedavg_keeps_state_keys_that_clients_do_not_send() -> None:
    s = FedAvg(FedAvg.config_class(name="fedavg"), scaling=1.0)
    frozen = AdapterKey("classifier", Role.DENSE)
    sent = AdapterKey("m", Role.A)
    state = {frozen: torch.ones(2), sent: torch.zeros(2)}
    new = s.aggregate(state, [{sent: torch.ones(2)}], s.weights([1]))
    assert torch.equal(new[frozen], state[frozen]) and torch.equal(new[sent], torch.ones(2))
