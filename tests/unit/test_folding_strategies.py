"""FLoRA, LoRA-FAIR and FedEx on random float64 tensors: stacking, corrections, residuals."""

from __future__ import annotations

import pytest
import torch

from fedlora.lora import AdapterKey, Role
from strategies.lora_fair import Factors, l2_correction
from tests.helpers import D_IN, D_OUT, MODULES, make

A0, B0 = AdapterKey(MODULES[0], Role.A), AdapterKey(MODULES[0], Role.B)


def clients(ranks: list[int], seed: int = 0, *, shared_a: bool = False) -> list[dict]:
    """One payload per client: random A (r_k, d_in), B (d_out, r_k) on every module, and a head."""
    g = torch.Generator().manual_seed(seed)
    a_shared = {m: torch.randn(ranks[0], D_IN, generator=g, dtype=torch.float64) for m in MODULES}
    out = []
    for r in ranks:
        payload = {AdapterKey("classifier", Role.DENSE): torch.randn(4, D_OUT, generator=g, dtype=torch.float64)}
        for m in MODULES:
            a = a_shared[m] if shared_a else torch.randn(r, D_IN, generator=g, dtype=torch.float64)
            payload[AdapterKey(m, Role.A)] = a
            payload[AdapterKey(m, Role.B)] = torch.randn(D_OUT, r, generator=g, dtype=torch.float64)
        out.append(payload)
    return out


def ideal(payloads: list[dict], p: torch.Tensor, module: str = MODULES[0]) -> torch.Tensor:
    """sum_k p_k B_k A_k, formed densely (the tests may; the strategies do not)."""
    a, b = AdapterKey(module, Role.A), AdapterKey(module, Role.B)
    return sum(pk * pl[b] @ pl[a] for pk, pl in zip(p, payloads, strict=True))


def state_like(payload: dict) -> dict:
    return {k: torch.zeros_like(v) for k, v in payload.items()}


# -- FLoRA -------------------------------------------------------------------------------
@pytest.mark.parametrize("replied", [[2, 4, 8, 16], [2, 16], [8]])
def test_flora_stacks_heterogeneous_ranks_exactly(replied: list[int]) -> None:
    """Any subset of ranks (2, 4, 8, 16) replies: s B A = sum_k p_k s B_k A_k, of rank sum r_k."""
    s = make("flora")
    payloads = clients(replied, seed=len(replied))
    p = s.weights([10 * r + 3 for r in replied])
    factors = s.fold(s.aggregate(state_like(payloads[0]), payloads, p), payloads, p)
    for m in MODULES:
        a, b = factors[AdapterKey(m, Role.A)], factors[AdapterKey(m, Role.B)]
        assert a.shape == (sum(replied), D_IN) and b.shape == (D_OUT, sum(replied))
        torch.testing.assert_close(s.scaling * b @ a, s.scaling * ideal(payloads, p, m), rtol=1e-12, atol=1e-12)


def test_flora_carries_p_on_a_only_and_averages_the_head() -> None:
    s = make("flora")
    payloads = clients([2, 2], seed=1)
    p = s.weights([1, 3])
    new = s.aggregate(state_like(payloads[0]), payloads, p)
    factors = s.fold(new, payloads, p)
    torch.testing.assert_close(factors[B0], torch.cat([payloads[0][B0], payloads[1][B0]], dim=1))
    torch.testing.assert_close(factors[A0], torch.cat([0.25 * payloads[0][A0], 0.75 * payloads[1][A0]]))
    head = AdapterKey("classifier", Role.DENSE)
    torch.testing.assert_close(new[head], 0.25 * payloads[0][head] + 0.75 * payloads[1][head])
    assert all(not v.any() for k, v in new.items() if k.role is Role.B)  # no adapter left on top


def test_flora_start_is_a_fresh_adapter_and_broadcast_holds_no_lora() -> None:
    s = make("flora")
    like = clients([4])[0]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    first, second = s.start({}, like=like, generator=g1), s.start({}, like=like, generator=g2)
    assert not first[B0].any() and first[A0].shape == like[A0].shape
    assert not torch.equal(first[A0], second[A0])  # each (round, client) draws its own A
    assert {k.role for k in s.broadcast(like)} == {Role.DENSE}


def test_flora_ranks_keep_one_scale() -> None:
    from strategies.flora import FLoRA, FLoRAConfig

    cfg = FLoRAConfig(name="flora", client_ranks="[2, 4, 8, 16]")
    assert cfg.client_ranks == "2,4,8,16" and FLoRA.model_rank(cfg, rank=8) == 16
    # s = lora.alpha / lora.rank = 2 whatever the model's (largest) rank.
    assert FLoRA.lora_alpha(cfg, rank=8, alpha=16.0) / FLoRA.model_rank(cfg, rank=8) == 2.0
    s = FLoRA(cfg, scaling=2.0)
    assert [s.client_rank(i, rank=16) for i in range(6)] == [2, 4, 8, 16, 2, 4]
    drawn = FLoRA(FLoRAConfig(name="flora", client_ranks="2,4", rank_rule="random", rank_seed=3), scaling=2.0)
    ranks = [drawn.client_rank(i, rank=4) for i in range(40)]
    assert set(ranks) == {2, 4} and ranks == [drawn.client_rank(i, rank=4) for i in range(40)]


# -- FedAvg's error, which FedEx and LoRA-FAIR remove ------------------------------------------
def test_fedavg_error_is_zero_when_all_a_are_equal() -> None:
    s = make("fedavg")
    payloads = clients([3, 3, 3], seed=4, shared_a=True)
    p = s.weights([5, 1, 2])
    new = s.aggregate(state_like(payloads[0]), payloads, p)
    torch.testing.assert_close(new[B0] @ new[A0], ideal(payloads, p), rtol=1e-12, atol=1e-12)


# -- FedEx ---------------------------------------------------------------------------------
def test_fedex_residual_makes_the_global_model_exact() -> None:
    """W0 + residual + s B_bar A_bar = W0 + s sum_k p_k B_k A_k."""
    s = make("fedex")
    payloads = clients([3, 3, 3, 3], seed=5)
    p = s.weights([4, 9, 1, 6])
    new = s.aggregate(state_like(payloads[0]), payloads, p)
    factors = s.fold(new, payloads, p)
    w0 = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for m in MODULES:
        a, b = AdapterKey(m, Role.A), AdapterKey(m, Role.B)
        residual = s.scaling * factors[b] @ factors[a]
        torch.testing.assert_close(
            w0 + residual + s.scaling * new[b] @ new[a], w0 + s.scaling * ideal(payloads, p, m), rtol=1e-12, atol=1e-12
        )
        assert factors[a].shape[0] == 5 * 3  # (K + 1) r
    # The residual is FedAvg's error, sum_k p_k (B_k - B_bar)(A_k - A_bar), non-zero here.
    covariance = sum(pk * (pl[B0] - new[B0]) @ (pl[A0] - new[A0]) for pk, pl in zip(p, payloads, strict=True))
    torch.testing.assert_close(factors[B0] @ factors[A0], covariance, rtol=1e-10, atol=1e-12)
    assert covariance.norm() > 1e-2


# -- LoRA-FAIR -----------------------------------------------------------------------------
def fair_round(objective: str, lam: float, seed: int = 6) -> tuple[dict, dict, list[dict], torch.Tensor]:
    """(LoRA-FAIR's diagnostics, its new state, the payloads, their weights) for one round."""
    s = make("lora_fair", objective=objective, lam=lam)
    payloads = clients([3, 3, 3, 3, 3], seed=seed)
    p = s.weights([3, 1, 4, 1, 5])
    new, report = s.aggregate_report(state_like(payloads[0]), payloads, p)
    return report, new, payloads, p


def fedavg_b(payloads: list[dict], p: torch.Tensor) -> torch.Tensor:
    return sum(pk * pl[B0] for pk, pl in zip(p, payloads, strict=True))


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / (x.norm() * y.norm()))


@pytest.mark.parametrize("objective", ["cosine", "l2"])
def test_lora_fair_with_a_huge_penalty_is_fedavg(objective: str) -> None:
    _, new, payloads, p = fair_round(objective, lam=1e12)
    torch.testing.assert_close(new[B0], fedavg_b(payloads, p), rtol=1e-9, atol=1e-9)


def test_lora_fair_l2_is_the_closed_form_and_beats_fedavg() -> None:
    lam = 0.01
    report, new, payloads, p = fair_round("l2", lam)
    a_bar, b_bar, target = new[A0], fedavg_b(payloads, p), ideal(payloads, p)
    gram = a_bar @ a_bar.T
    closed = (target - b_bar @ a_bar) @ a_bar.T @ torch.linalg.inv(gram + lam * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(new[B0] - b_bar, closed, rtol=1e-9, atol=1e-12)
    # It minimises ||dW* - (B_bar + dB) A_bar||^2 + lam ||dB||^2: the gradient there is zero.
    db = (new[B0] - b_bar).clone().requires_grad_(True)
    loss = (target - (b_bar + db) @ a_bar).square().sum() + lam * db.square().sum()
    (grad,) = torch.autograd.grad(loss, db)
    assert grad.abs().max() < 1e-9
    fair = (target - new[B0] @ a_bar).norm() / target.norm()
    fedavg = (target - b_bar @ a_bar).norm() / target.norm()
    assert fair < fedavg
    assert report["residual"] < report["residual_fedavg"]


def test_lora_fair_cosine_raises_the_similarity_above_fedavg() -> None:
    report, new, payloads, p = fair_round("cosine", 0.01)
    a_bar, target = new[A0], ideal(payloads, p)
    assert cosine(target, new[B0] @ a_bar) > cosine(target, fedavg_b(payloads, p) @ a_bar) + 1e-3
    assert report["cosine"] > report["cosine_fedavg"]


def test_lora_fair_report_matches_dense_residuals() -> None:
    """The small-factor residuals (all layers together) equal the ones from dense matrices."""
    report, new, payloads, p = fair_round("l2", 0.01)
    fair = fedavg = star = 0.0
    for m in MODULES:
        a, b = AdapterKey(m, Role.A), AdapterKey(m, Role.B)
        target = ideal(payloads, p, m)
        b_bar = sum(pk * pl[b] for pk, pl in zip(p, payloads, strict=True))
        fair += float((target - new[b] @ new[a]).square().sum())
        fedavg += float((target - b_bar @ new[a]).square().sum())
        star += float(target.square().sum())
    assert report["residual"] == pytest.approx((fair / star) ** 0.5, rel=1e-8)
    assert report["residual_fedavg"] == pytest.approx((fedavg / star) ** 0.5, rel=1e-8)


def test_factor_algebra_never_needs_the_dense_product() -> None:
    g = torch.Generator().manual_seed(9)
    b_star, a_star = (
        torch.randn(D_OUT, 12, generator=g, dtype=torch.float64),
        torch.randn(12, D_IN, generator=g, dtype=torch.float64),
    )
    a_bar, m = (
        torch.randn(3, D_IN, generator=g, dtype=torch.float64),
        torch.randn(D_OUT, 3, generator=g, dtype=torch.float64),
    )
    f = Factors(b_star, a_star, a_bar)
    dense = b_star @ a_star
    assert float(f.inner(m)) == pytest.approx(float((dense * (m @ a_bar)).sum()), rel=1e-10)
    assert float(f.norm2(m)) == pytest.approx(float((m @ a_bar).square().sum()), rel=1e-10)
    assert float(f.norm2_star) == pytest.approx(float(dense.square().sum()), rel=1e-10)
    assert l2_correction(f, m, 0.0).shape == m.shape
