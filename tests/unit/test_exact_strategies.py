"""FFA-LoRA, FedSVD and Fed-SB: their aggregation identities, on random float64 tensors.

The same clients' updates go through FedAvg too, so the tests can tell an exact
aggregation from an inexact one.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.lora import AdapterKey, Role
from strategies.base import partner
from strategies.fed_sb import lora_sb_factors
from strategies.fedsvd import refactorise
from tests.helpers import MODULES, make, random_adapter, server_step

S = 2.0  # the scaling `make` gives every strategy


def refactorise_full(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSVD's refactorisation from a thin SVD of the full d_out x d_in product: the reference."""
    rank = b.shape[1]
    u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def full_update(name: str, tensors: dict, module: str) -> torch.Tensor:
    """dW of one module under the strategy's parametrisation."""
    a, b = tensors[AdapterKey(module, Role.A)], tensors[AdapterKey(module, Role.B)]
    if name == "fed_sb":
        return b @ tensors[AdapterKey(module, Role.R)] @ a  # scaling 1
    return S * b @ a


def clients(name: str, k: int = 4, seed: int = 3) -> tuple[object, dict, list[dict], list[dict], torch.Tensor]:
    """(strategy, state, payloads, clients' full adapters, p) for k clients with random updates."""
    s = make(name)
    g = torch.Generator().manual_seed(seed)
    state = s.initial_state(random_adapter(g, with_r=Role.R in s.adapter_roles), generator=g)
    if name == "fed_sb":  # B, A as the LoRA-SB init leaves them; any fixed pair would do
        state = {**state, **random_adapter(g, with_r=True)}
    locals_, payloads = [], []
    for _ in range(k):
        trained = {key: v + torch.randn(v.shape, generator=g, dtype=v.dtype) for key, v in state.items()}
        mine = {key: (trained[key] if s.trainable(key) else state[key]) for key in state}
        locals_.append(mine)
        payloads.append(s.payload({key: v for key, v in mine.items() if s.trainable(key)}))
    return s, state, payloads, locals_, s.weights([5, 1, 9, 3][:k])


@pytest.mark.parametrize("name", ["ffa_lora", "fedsvd", "fed_sb", "fedavg"])
def test_aggregate_equals_the_weighted_mean_of_full_updates_only_when_exact(name: str) -> None:
    s, state, payloads, locals_, p = clients(name)
    new = server_step(s, state, payloads, p)
    worst = 0.0
    for module in MODULES:
        mean = sum(pk * full_update(name, mine, module) for pk, mine in zip(p, locals_, strict=True))
        worst = max(worst, (full_update(name, new, module) - mean).abs().max().item())
    if name == "fedavg":
        assert worst > 1e-3  # averaging A and B separately is not averaging B A
    else:
        assert worst < 1e-10


def test_ffa_lora_trains_and_sends_b_only_and_keeps_a() -> None:
    s, state, payloads, _, p = clients("ffa_lora")
    assert {k.role for pl in payloads for k in pl} == {Role.B}
    new = server_step(s, state, payloads, p)
    for key in (k for k in state if k.role is Role.A):
        assert torch.equal(new[key], state[key])
    assert not any(k.role is Role.A for k in s.broadcast(new))  # every process derives A from the seed


def test_ffa_lora_a_is_the_same_draw_for_the_same_seed_and_b_starts_at_zero() -> None:
    s = make("ffa_lora")
    adapters = random_adapter(torch.Generator().manual_seed(0))
    one = s.initial_state(adapters, generator=torch.Generator().manual_seed(11))
    two = s.initial_state(adapters, generator=torch.Generator().manual_seed(11))
    other = s.initial_state(adapters, generator=torch.Generator().manual_seed(12))
    for key in one:
        assert torch.equal(one[key], two[key])
        if key.role is Role.B:
            assert not one[key].any()
    a = AdapterKey(MODULES[0], Role.A)
    assert not torch.equal(one[a], other[a])
    assert one[a].abs().max() <= 1 / one[a].shape[1] ** 0.5  # kaiming-uniform bound, as peft draws A


def test_fedsvd_refactorises_without_changing_the_update() -> None:
    s, state, payloads, _, p = clients("fedsvd")
    new = server_step(s, state, payloads, p)
    b_bar = {k: sum(pk * pl[k] for pk, pl in zip(p, payloads, strict=True)) for k in payloads[0]}
    for module in MODULES:
        a_key, b_key = AdapterKey(module, Role.A), AdapterKey(module, Role.B)
        torch.testing.assert_close(new[b_key] @ new[a_key], b_bar[b_key] @ state[a_key], rtol=1e-10, atol=1e-12)
        a = new[a_key]
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=a.dtype), rtol=0, atol=1e-12)
        # B = U S: its columns are orthogonal, with norms the singular values in decreasing order
        gram = new[b_key].T @ new[b_key]
        norms = gram.diagonal()
        torch.testing.assert_close(gram, torch.diag(norms), rtol=0, atol=1e-10)
        assert (norms[:-1] >= norms[1:]).all()


def test_fedsvd_refactor_every_skips_the_rounds_in_between() -> None:
    s = make("fedsvd", refactor_every=2)
    _, state, payloads, _, p = clients("fedsvd")
    odd = server_step(s, state, payloads, p, server_round=1)
    even = server_step(s, state, payloads, p, server_round=2)
    a = AdapterKey(MODULES[0], Role.A)
    assert torch.equal(odd[a], state[a]) and not torch.equal(even[a], state[a])


def test_small_factor_svd_equals_the_full_svd_up_to_sign() -> None:
    g = torch.Generator().manual_seed(4)
    b = torch.randn(40, 6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 30, generator=g, dtype=torch.float64)
    b_small, a_small = refactorise(b, a)
    b_full, a_full = refactorise_full(b, a)
    signs = torch.sign((a_small * a_full).sum(dim=1))  # one sign per singular pair
    torch.testing.assert_close(a_small * signs[:, None], a_full, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(b_small * signs, b_full, rtol=1e-9, atol=1e-10)


def test_fed_sb_trains_and_sends_r_only_and_exports_a_standard_lora() -> None:
    s, state, payloads, _, p = clients("fed_sb")
    assert {k.role for pl in payloads for k in pl} == {Role.R}
    new = server_step(s, state, payloads, p)
    assert {k.role for k in s.fixed(new)} == {Role.A, Role.B}
    assert {k.role for k in s.broadcast(new)} == {Role.R, Role.DENSE}
    exported = s.export(new)
    assert not any(k.role is Role.R for k in exported)
    for module in MODULES:
        a, b = AdapterKey(module, Role.A), AdapterKey(module, Role.B)
        torch.testing.assert_close(exported[b] @ exported[a], full_update("fed_sb", new, module))


def sign_gradient(seed: int, d_out: int = 48, d_in: int = 36) -> torch.Tensor:
    """A gradient-like matrix: a few strong directions plus noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(d_out, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, d_in, generator=g, dtype=torch.float64
    )
    return low + 0.5 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("exact", [True, False])
def test_lora_sb_init_is_orthonormal_and_the_best_rank_r_approximation(exact: bool) -> None:
    grad, rank, lr = sign_gradient(0), 5, 1e-3
    b, r0, a = lora_sb_factors(grad, rank=rank, lr=lr, exact=exact, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(rank, dtype=torch.float64)
    torch.testing.assert_close(b.T @ b, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(a @ a.T, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(r0, torch.diag(r0.diagonal()))  # R_0 = diag(S)
    g = -lr * torch.sign(grad)
    u, sv, vh = torch.linalg.svd(g)
    best = (u[:, :rank] * sv[:rank]) @ vh[:rank]
    if exact:
        torch.testing.assert_close(b @ r0 @ a, best, rtol=1e-9, atol=1e-12)
    else:  # torch.svd_lowrank: a randomised sketch, within a few per cent of the optimum
        optimum = torch.linalg.norm(g - best)
        assert optimum <= torch.linalg.norm(g - b @ r0 @ a) <= 1.05 * optimum


def test_lora_sb_init_is_seeded() -> None:
    grad = sign_gradient(1)
    one = lora_sb_factors(grad, rank=4, lr=1.0, exact=False, generator=torch.Generator().manual_seed(3))
    two = lora_sb_factors(grad, rank=4, lr=1.0, exact=False, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(one, two, strict=True))


def test_fed_sb_initialise_sets_every_module_from_its_gradient_at_the_warm_up_scale() -> None:
    """eta_1 = lr / (warmup_ratio x total steps): 0.5 / (0.06 x 50) = 1/6; B R_0 A is the exact truncated SVD."""
    s = make("fed_sb", init_svd="exact")
    g = torch.Generator().manual_seed(2)
    state = random_adapter(g, with_r=True)
    grads = {AdapterKey(m, Role.BASE): torch.randn(6, 5, generator=g, dtype=torch.float64) for m in MODULES}
    new = s.initialise(state, grads, lr=0.5, total_steps=50, generator=g)
    for key, grad in grads.items():
        b, r0, a = (new[partner(key, role)] for role in (Role.B, Role.R, Role.A))
        assert b.shape == (6, 3) and r0.shape == (3, 3) and a.shape == (3, 5)
        u, sv, vh = torch.linalg.svd(-(0.5 / (0.06 * 50)) * torch.sign(grad))
        torch.testing.assert_close(b @ r0 @ a, (u[:, :3] * sv[:3]) @ vh[:3], rtol=1e-9, atol=1e-12)


def test_fed_sb_first_step_lr_is_the_authors_warm_up_formula_unless_set() -> None:
    from strategies.fed_sb import FedSBConfig

    assert FedSBConfig(name="fed_sb").first_step_lr(lr=1e-3, total_steps=100) == pytest.approx(1e-3 / (0.06 * 100))
    dp_script = FedSBConfig(name="fed_sb", init_warmup_ratio=1.0)  # the authors' DP script: lr / T
    assert dp_script.first_step_lr(lr=1e-3, total_steps=100) == pytest.approx(1e-5)
    assert FedSBConfig(name="fed_sb", init_lr=0.02).first_step_lr(lr=1e-3, total_steps=100) == 0.02


def test_svd_lowrank_with_the_default_iterations_is_near_optimal_on_a_sign_matrix() -> None:
    """384 x 384 gradient signs, rank 8: 10 power iterations (the default, as the authors) come within 0.2%
    of the best rank-8 residual; torch's default 2 do not."""
    from strategies.fed_sb import FedSBConfig

    grad = torch.randn(384, 384, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = -torch.sign(grad)
    u, sv, vh = torch.linalg.svd(g)
    optimum = torch.linalg.norm(g - (u[:, :8] * sv[:8]) @ vh[:8])

    def excess(niter: int) -> float:
        b, r0, a = lora_sb_factors(
            grad, rank=8, lr=1.0, exact=False, generator=torch.Generator().manual_seed(0), niter=niter
        )
        return float(torch.linalg.norm(g - b @ r0 @ a) / optimum - 1)

    assert 0 <= excess(FedSBConfig(name="fed_sb").init_svd_iters) < 0.002 < excess(2)


def test_fed_sb_uses_scaling_one_and_other_strategies_follow_their_alpha() -> None:
    from strategies import get_strategy_class

    fed_sb, ffa = get_strategy_class("fed_sb"), get_strategy_class("ffa_lora")
    assert fed_sb.lora_alpha(fed_sb.config_class(name="fed_sb"), rank=8, alpha=16) == 8
    assert ffa.lora_alpha(ffa.config_class(name="ffa_lora"), rank=8, alpha=16) == 64
    assert ffa.lora_alpha(ffa.config_class(name="ffa_lora", alpha=None), rank=8, alpha=16) == 16


@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [
        ("fedsvd", {"refactor_every": 0}, "refactor_every"),
        ("ffa_lora", {"alpha": -1.0}, "alpha"),
        ("fed_sb", {"init_samples": 0}, "init_samples"),
        ("fed_sb", {"init_svd": "qr"}, "init_svd"),
        ("fed_sb", {"weighting": "sizes"}, "weighting"),
    ],
)
def test_bad_strategy_settings_are_refused(name: str, fields: dict, message: str) -> None:
    from strategies import get_strategy_class

    cls = get_strategy_class(name)
    with pytest.raises(ValueError, match=message):
        cls.config_class(name=name, **fields)
