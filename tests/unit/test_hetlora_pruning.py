"""HetLoRA's rank self-pruning: the penalty's gradient, its step, the pruning rule, and the client round
and the server's check that carry a pruned rank."""

from __future__ import annotations

import pytest
import torch

from fedlora.config.errors import ConfigError
from fedlora.federation.validation import reject_reason
from fedlora.learning.worker import Worker
from fedlora.lora import AdapterKey, Role, truncate_rank
from strategies.ranks import RankState
from tests.helpers import D_IN, D_OUT, MODULES, make

R_MAX = 8


def adapter(g: torch.Generator, rank: int = R_MAX) -> dict[AdapterKey, torch.Tensor]:
    out = {}
    for m in MODULES:
        out[AdapterKey(m, Role.A)] = torch.randn(rank, D_IN, generator=g, dtype=torch.float64)
        out[AdapterKey(m, Role.B)] = torch.randn(D_OUT, rank, generator=g, dtype=torch.float64)
    return out


def test_the_penalty_step_is_the_proximal_map_of_the_tail_penalty() -> None:
    """Each tail factor x0 goes to argmin_x 1/2 ||x - x0||^2 + c ||x|| (c: lr lambda times the other factor's
    norm): x0 shrunk along itself, no random point scores better; a step larger than the norm gives exactly 0."""
    s = make("hetlora", prune_lambda=2.0, prune_gamma=0.5)
    params = adapter(torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in params.items()}
    lr = 0.01
    s.penalty_step(params, R_MAX, lr=lr)
    g = torch.Generator().manual_seed(1)
    for key in MODULES:
        a0, b0 = before[AdapterKey(key, Role.A)][4:], before[AdapterKey(key, Role.B)][:, 4:]
        for x0, x, other in (
            (b0, params[AdapterKey(key, Role.B)][:, 4:], a0),
            (a0, params[AdapterKey(key, Role.A)][4:], b0),
        ):
            c = lr * 2.0 * float(other.norm())

            def objective(y: torch.Tensor, x0=x0, c=c) -> float:
                return float(0.5 * (y - x0).pow(2).sum() + c * y.norm())

            torch.testing.assert_close(x, x0 * (1 - c / float(x0.norm())))
            assert all(objective(x) <= objective(x + 0.01 * torch.randn(x.shape, generator=g, dtype=x.dtype))
                       for _ in range(20))  # fmt: skip
    s.penalty_step(params, R_MAX, lr=1e6)
    assert s.tail_norm(params, R_MAX) == 0.0 and all(v.isfinite().all() for v in params.values())


def test_the_penalty_step_shrinks_only_the_tail() -> None:
    """Rank 8, gamma 0.75: directions 6 and 7 shrink, 0-5 stay bit-identical; the tail norm falls."""
    s = make("hetlora", prune_lambda=1.0, prune_gamma=0.75)
    params = adapter(torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in params.items()}
    assert s.tail_start(R_MAX) == 6
    s.penalty_step(params, R_MAX, lr=0.01)
    for key, value in params.items():
        head = value[:6] if key.role is Role.A else value[:, :6]
        assert torch.equal(head, before[key][:6] if key.role is Role.A else before[key][:, :6])
    assert s.tail_norm(params, R_MAX) < s.tail_norm(before, R_MAX)


def test_a_client_prunes_only_when_its_tail_fell_since_its_last_round_at_that_rank() -> None:
    s = make("hetlora", prune_lambda=1.0, prune_gamma=0.5)
    tensors = adapter(torch.Generator().manual_seed(2))
    norm = s.tail_norm(tensors, R_MAX)
    assert s.next_state(tensors, R_MAX, None) == RankState(R_MAX, norm)  # a first round: nothing to compare
    assert s.next_state(tensors, R_MAX, RankState(R_MAX, norm / 2)).rank == R_MAX  # it grew: kept
    pruned = s.next_state(tensors, R_MAX, RankState(R_MAX, norm * 2))
    assert pruned == RankState(4, s.tail_norm(tensors, 4))  # the new rank's tail, for the next comparison
    assert s.next_state(tensors, 4, RankState(R_MAX, norm * 2)).rank == 4  # last round at another rank: kept
    assert s.tail_start(1) == 1 and s.next_state(tensors, 1, RankState(1, 1e9)).rank == 1  # never below rank 1
    zero = tensors | {k: torch.cat([v[:, :4], torch.zeros(D_OUT, 4, dtype=v.dtype)], 1)
                      for k, v in tensors.items() if k.role is Role.B}  # fmt: skip
    assert s.next_state(zero, R_MAX, None) == RankState(4, s.tail_norm(tensors, 4))  # a zero tail goes at once


@pytest.mark.parametrize("field", ["prune_lambda=-1", "prune_gamma=1", "prune_gamma=0"])
def test_bad_pruning_settings_are_config_errors(field: str, make_config) -> None:
    with pytest.raises(ConfigError, match=field.split("=")[0]):
        make_config("strategy=hetlora", f"strategy.{field}")


@pytest.mark.parametrize("private", [False, True])
def test_a_client_round_penalises_its_tail_and_sends_its_pruned_rank(private: bool, make_config) -> None:
    """From the same start and batches, the penalty leaves a smaller tail than no penalty; told that its tail
    was larger last round, the client prunes and sends rank 2, which the server's check takes (under DP-SGD
    too: the penalty reads no example)."""
    dp = ["privacy=dp", "privacy.noise_multiplier=1.0"] if private else []
    runs = {}
    for lam in (0.0, 0.5):
        cfg = make_config(
            "strategy=hetlora",
            "lora.rank=4",
            f"strategy.prune_lambda={lam}",
            "strategy.prune_gamma=0.5",
            "train.lr=0.05",
            *dp,
        )
        worker = Worker(cfg, num_partitions=4)
        state = worker.adapted.initial_state()
        state |= {k: torch.full_like(v, 0.3) for k, v in state.items() if k.role is Role.B}  # a tail to shrink
        payload, _, result = worker.train_round(1, state, server_round=1, history=[] if private else None)
        runs[lam] = (worker, state, payload, result)
    worker, state, payload, result = runs[0.5]
    strategy = worker.strategy
    assert runs[0.0][3].rank_state is None  # no penalty, no state
    assert result.rank_state == RankState(4, strategy.tail_norm(payload, 4))
    if not private:  # under DP each run draws its own noise: the two tails are not comparable
        assert strategy.tail_norm(payload, 4) < strategy.tail_norm(runs[0.0][2], 4)
    larger = RankState(4, result.rank_state.tail_norm * 10)
    payload, _, result = worker.train_round(1, state, server_round=2, own=larger, history=[] if private else None)
    assert result.rank_state.rank == 2
    assert {v.shape[0] for k, v in payload.items() if k.role is Role.A} == {2}
    assert {v.shape[1] for k, v in payload.items() if k.role is Role.B} == {2}
    expected = worker.adapted.protocol.expected_reply(1, state, server_round=3, reply=payload)  # the server's check
    assert reject_reason(payload, expected) is None


def test_the_server_takes_any_rank_up_to_the_assigned_one_and_the_same_in_every_module(make_config) -> None:
    cfg = make_config("strategy=hetlora", "strategy.client_ranks=[2,4]", "strategy.prune_lambda=1")
    protocol = Worker(cfg, num_partitions=4).adapted.protocol
    state = protocol.initial
    full = protocol.expected_reply(1, state, server_round=1)  # partition 1: rank 4
    for rank in (1, 3, 4):
        reply = truncate_rank(full, rank)
        assert reject_reason(reply, protocol.expected_reply(1, state, server_round=1, reply=reply)) is None
    over = truncate_rank(protocol.expected_reply(1, state, server_round=1), 4)  # partition 0 is rank 2
    assert "shape" in reject_reason(over, protocol.expected_reply(0, state, server_round=1, reply=over))
    mixed = dict(truncate_rank(full, 3))
    b_key = next(k for k in mixed if k.role is Role.B and k.module != min(k.module for k in mixed))
    mixed[b_key] = full[b_key]  # one module at rank 4, the others at 3
    assert "shape" in reject_reason(mixed, protocol.expected_reply(1, state, server_round=1, reply=mixed))
    empty = truncate_rank(full, 0)  # rank 0 is no rank: the assigned one is expected
    assert "shape" in reject_reason(empty, protocol.expected_reply(1, state, server_round=1, reply=empty))
