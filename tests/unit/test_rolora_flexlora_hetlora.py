"""RoLoRA (alternating factors), FlexLoRA and HetLoRA (heterogeneous ranks): their own identities."""

from __future__ import annotations

import pytest
import torch

from fedlora.learning.worker import Worker
from fedlora.lora import AdapterKey, Role, truncate_rank
from strategies.flexlora import truncated_product
from strategies.ranks import product_norm
from strategies.rolora import factor_of
from tests.helpers import D_IN, D_OUT, MODULES, R, make, random_adapter, server_step

HEAD = AdapterKey("classifier", Role.DENSE, "weight")


def products(s, state: dict) -> dict:
    """s * B A per module."""
    return {k: s.scaling * state[k] @ state[AdapterKey(k.module, Role.A)] for k in state if k.role is Role.B}


# -- RoLoRA --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("server_round", [1, 2, 3, 4])
def test_rolora_trains_one_factor_per_round_and_its_average_is_exact(server_round: int) -> None:
    """Every client shares the frozen factor, so the new s B A is sum_k p_k s B_k A_k in each round."""
    s = make("rolora")
    g = torch.Generator().manual_seed(server_round)
    state = random_adapter(g)
    role = factor_of(server_round)
    assert role is (Role.B if server_round % 2 else Role.A)
    payloads, models = [], []
    for _ in range(4):
        trained = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}
        payload = s.payload(
            {k: v for k, v in trained.items() if k.role is Role.DENSE or s.trains(k, server_round=server_round)}
        )
        assert {k.role for k in payload} == {role, Role.DENSE}
        payloads.append(payload)
        models.append(products(s, state | payload))
    p = s.weights([3, 1, 7, 2])
    new = server_step(s, state, payloads, p, server_round=server_round)
    for key, got in products(s, new).items():
        want = sum(pk * m[key] for pk, m in zip(p, models, strict=True))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    frozen = Role.A if role is Role.B else Role.B
    assert all(torch.equal(new[k], state[k]) for k in state if k.role is frozen)


def test_rolora_upload_is_one_factor_by_the_formula(make_config) -> None:
    """On the tiny model (two adapted 32 x 32 weights per layer): the reply is d_out r numbers per module in B
    rounds and r d_in in A rounds, plus the head; the download is both factors."""
    worker = Worker(make_config("strategy=rolora", "lora.target_modules=[query]"), num_partitions=4)
    protocol = worker.adapted.protocol
    state = worker.adapted.initial_state()
    head = sum(v.numel() for k, v in state.items() if k.role is Role.DENSE)
    for server_round, role in ((1, Role.B), (2, Role.A)):
        reply = protocol.expected_reply(0, state, server_round=server_round)
        lora_keys = [k for k in reply if k.role is not Role.DENSE]
        assert lora_keys and {k.role for k in lora_keys} == {role}
        d_out, r = state[next(k for k in state if k.role is Role.B)].shape
        per_module = d_out * r if role is Role.B else r * state[next(k for k in state if k.role is Role.A)].shape[1]
        assert sum(v.numel() for v in reply.values()) == len(lora_keys) * per_module + head
    assert {k.role for k in protocol.download(state)} >= {Role.A, Role.B}


def test_rolora_under_dp_sgd_moves_only_the_round_factor(make_config) -> None:
    """Opacus privatises whichever factor trains: B in round 1 (A bit-identical), A in round 2 (B identical)."""
    cfg = make_config("strategy=rolora", "train.lr=0.05", "privacy=dp", "privacy.noise_multiplier=1.0")
    worker = Worker(cfg, num_partitions=4)
    state = worker.adapted.initial_state()
    for server_round in (1, 2):
        role = factor_of(server_round)
        payload, _, result = worker.train_round(1, state, server_round=server_round, history=[])
        assert result.steps > 0 and {k.role for k in payload} <= {role, Role.DENSE}
        moved = [k for k, v in payload.items() if k.role is role and not torch.equal(v, state[k])]
        assert moved
        state = state | payload
        other = Role.A if role is Role.B else Role.B
        params = worker.adapted.params
        assert all(torch.equal(params[k].detach(), state[k]) for k in state if k.role is other)


# -- FlexLoRA ------------------------------------------------------------------------------------------------
def hetero_payloads(g: torch.Generator, ranks: list[int]) -> list[dict]:
    out = []
    for r in ranks:
        payload = {HEAD: torch.randn(4, D_OUT, generator=g, dtype=torch.float64)}
        for m in MODULES:
            payload[AdapterKey(m, Role.A)] = torch.randn(r, D_IN, generator=g, dtype=torch.float64)
            payload[AdapterKey(m, Role.B)] = torch.randn(D_OUT, r, generator=g, dtype=torch.float64)
        out.append(payload)
    return out


def test_flexlora_gives_the_best_rank_r_approximation_of_the_average_product() -> None:
    """Eckart-Young on the dense average M = sum_k p_k B_k A_k: the model-rank factors and every client's
    truncation to r_k lose exactly the tail of M's singular values; ``truncation`` reports that loss."""
    s = make("flexlora", client_ranks="[1,2,3]")
    g = torch.Generator().manual_seed(0)
    state = random_adapter(g)  # rank R = 3 = the largest client rank
    payloads = hetero_payloads(g, [1, 2, 3, 3])
    p = s.weights([5, 1, 2, 4])
    new, report = s.aggregate_report(state, payloads, p)
    lost = total = 0.0
    for m in MODULES:
        b_key, a_key = AdapterKey(m, Role.B), AdapterKey(m, Role.A)
        dense = sum(pk * pl[b_key] @ pl[a_key] for pk, pl in zip(p, payloads, strict=True))
        sv = torch.linalg.svdvals(dense)
        assert new[b_key].shape == (D_OUT, R) and new[a_key].shape == (R, D_IN)
        for rank in (1, 2, 3):
            mine = truncate_rank({b_key: new[b_key], a_key: new[a_key]}, rank)
            error = torch.linalg.matrix_norm(dense - mine[b_key] @ mine[a_key])
            torch.testing.assert_close(error, sv[rank:].square().sum().sqrt(), rtol=1e-9, atol=1e-10)
        # S^(1/2) on each side: the factors carry equal norms.
        torch.testing.assert_close(new[b_key].norm(dim=0), new[a_key].norm(dim=1), rtol=1e-9, atol=1e-10)
        lost, total = lost + float(sv[R:].square().sum()), total + float(sv.square().sum())
    assert report["truncation"] == pytest.approx((lost / total) ** 0.5, rel=1e-9) and report["truncation"] > 0
    torch.testing.assert_close(new[HEAD], sum(pk * pl[HEAD] for pk, pl in zip(p, payloads, strict=True)))


def test_flexlora_pads_with_zeros_when_the_average_has_lower_rank() -> None:
    b, a = torch.randn(D_OUT, 1, dtype=torch.float64), torch.randn(1, D_IN, dtype=torch.float64)
    new_b, new_a, total, lost = truncated_product(b, a, 3)
    assert new_b.shape == (D_OUT, 3) and lost == pytest.approx(0.0, abs=1e-20)
    torch.testing.assert_close(new_b @ new_a, b @ a)
    assert float(new_b[:, 1:].abs().max()) < 1e-12 and total > 0


# -- HetLoRA -------------------------------------------------------------------------------------------------
def test_hetlora_zero_pads_and_weights_by_the_norm_of_each_product() -> None:
    s = make("hetlora", client_ranks="[1,3]")
    g = torch.Generator().manual_seed(1)
    state = random_adapter(g)
    payloads = hetero_payloads(g, [1, 3])
    p = s.weights([1, 1])
    new = s.aggregate(state, payloads, p)
    for m in MODULES:
        b_key, a_key = AdapterKey(m, Role.B), AdapterKey(m, Role.A)
        norms = [float(torch.linalg.matrix_norm(pl[b_key] @ pl[a_key])) for pl in payloads]
        assert [product_norm(pl[b_key], pl[a_key]) for pl in payloads] == pytest.approx(norms, rel=1e-12)
        w = [n / sum(norms) for n in norms]
        want_a = w[1] * payloads[1][a_key]
        want_a[:1] += w[0] * payloads[0][a_key]  # the rank-1 client fills only the first row
        torch.testing.assert_close(new[a_key], want_a)
        want_b = w[1] * payloads[1][b_key]
        want_b[:, :1] += w[0] * payloads[0][b_key]
        torch.testing.assert_close(new[b_key], want_b)
    torch.testing.assert_close(new[HEAD], (payloads[0][HEAD] + payloads[1][HEAD]) / 2)  # the head by p alone


def test_hetlora_a_client_that_did_nothing_counts_nothing() -> None:
    s = make("hetlora", client_ranks="[2,3]")
    g = torch.Generator().manual_seed(2)
    state = random_adapter(g)
    payloads = hetero_payloads(g, [2, 3])
    for key in [k for k in payloads[0] if k.role is Role.B]:
        payloads[0][key] = torch.zeros_like(payloads[0][key])  # B = 0: a zero product
    new = s.aggregate(state, payloads, s.weights([100, 1]))
    for key in (k for k in new if k.role in (Role.A, Role.B)):
        torch.testing.assert_close(new[key], payloads[1][key])


@pytest.mark.parametrize("name", ["flexlora", "hetlora"])
def test_heterogeneous_rank_strategies_build_the_largest_rank_and_keep_one_scale(name: str, make_config) -> None:
    cfg = make_config(f"strategy={name}", "strategy.client_ranks=[2,4,8]", "lora.rank=4")
    worker = Worker(cfg, num_partitions=6)
    assert cfg.model_rank == 8 and cfg.scaling == cfg.lora.alpha / 4
    assert [worker.adapted.protocol.rank_mask(pid).rank for pid in range(6)] == [2, 4, 8, 2, 4, 8]
    state = worker.adapted.initial_state()
    payload, _, _ = worker.train_round(0, worker.adapted.protocol.download(state), server_round=1)
    assert {v.shape for k, v in payload.items() if k.role is Role.A} == {(2, 32)}
