"""strategies.robust: weights, update clipping and robust means that one client cannot drag."""

from __future__ import annotations

import pytest
import torch

from fedlora.config.compose import compose
from fedlora.config.run import ConfigError
from strategies.robust import (
    cap_counts,
    clip_updates,
    combiner,
    krum_drops,
    lower_median,
    median,
    multi_krum,
    trimmed_mean,
    update_norm,
)
from tests.helpers import random_adapter


def test_lower_median_is_an_honest_value_when_honest_clients_are_a_majority() -> None:
    assert lower_median([5.0, 1.0, 1e9]) == 5.0
    assert lower_median([2.0, 1e9]) == 2.0  # two clients: the smaller
    assert lower_median([3.0]) == 3.0


def test_counts_are_the_servers_where_it_knows_them_and_capped_elsewhere() -> None:
    assert cap_counts([100, 10**9, 90], [100, 120, 90], ratio=10) == [100, 120, 90]  # min(claim, known)
    assert cap_counts([100, 10**9, 90, 110], [None] * 4, ratio=10) == [100, 1000, 90, 110]  # 10 x median 100
    assert cap_counts([50, 60], [None, None], ratio=2) == [50, 60]  # honest claims pass


def test_clipped_updates_stay_within_factor_times_the_median_norm() -> None:
    g = torch.Generator().manual_seed(0)
    start = random_adapter(g)
    honest = [
        {k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in start.items()} for _ in range(4)
    ]
    attacker = {k: v + 100.0 for k, v in start.items()}
    clipped, norms, bound = clip_updates([*honest, attacker], [start] * 5, factor=10)
    assert bound == pytest.approx(10 * sorted(norms)[2])
    assert update_norm(clipped[4], start) == pytest.approx(bound)  # the attacker scaled down to the bound
    assert all(clipped[i] is honest[i] for i in range(4))  # honest updates untouched
    scale = bound / norms[4]  # along its own direction
    assert all(torch.allclose(clipped[4][k] - start[k], scale * (attacker[k] - start[k])) for k in start)
    # The weighted mean then moves at most sum_k p_k ||delta_k|| from the start.
    p = torch.full((5,), 0.2, dtype=torch.float64)
    mean = {k: combiner("mean")([c[k] for c in clipped], p) for k in start}
    assert update_norm(mean, start) <= 0.2 * (sum(norms[:4]) + bound) + 1e-9


def test_trimmed_mean_and_median_by_hand() -> None:
    values = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, 20.0]), torch.tensor([3.0, 30.0]),
              torch.tensor([4.0, 40.0]), torch.tensor([1000.0, -1000.0])]  # fmt: skip
    p = torch.full((5,), 0.2)
    assert torch.equal(trimmed_mean(0.2)(values, p), torch.tensor([3.0, 20.0]))  # drops 1 at each end
    assert torch.equal(median(values, p), torch.tensor([3.0, 20.0]))
    assert torch.equal(median(values[:4], p[:4]), torch.tensor([2.5, 25.0]))  # even: the middle two's mean
    assert torch.equal(trimmed_mean(0.0)(values[:2], p[:2]), torch.tensor([1.5, 15.0]))  # no trim: the plain mean


def test_robust_means_stay_within_the_honest_range_per_coordinate() -> None:
    g = torch.Generator().manual_seed(1)
    honest = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    attacker = torch.full((6, 5), 1e6, dtype=torch.float64)
    low, high = torch.stack(honest).min(0).values, torch.stack(honest).max(0).values
    p = torch.full((5,), 0.2, dtype=torch.float64)
    for combine in (median, trimmed_mean(0.2)):
        got = combine([*honest, attacker], p)
        assert (got >= low).all() and (got <= high).all()
    assert not (combiner("mean")([*honest, attacker], p) <= high).all()  # the plain mean is dragged


@pytest.mark.parametrize("strategy", ["flora", "fedex"])
def test_robust_aggregation_is_refused_where_the_server_combines_exactly(strategy) -> None:
    with pytest.raises(ConfigError, match=f"server.aggregation=median is refused for strategy={strategy}"):
        compose([f"strategy={strategy}", "server.aggregation=median"])
    assert compose(["strategy=fed_sb", "server.aggregation=trimmed_mean"])[0].server.aggregation == "trimmed_mean"


def test_bad_robustness_settings_fail_clearly() -> None:
    for override, message in (
        ("server.aggregation=mode", "unknown server.aggregation"),
        ("server.trim_fraction=0.5", "server.trim_fraction must be in"),
        ("server.update_clip=0.5", "server.update_clip must be >= 1"),
        ("server.max_weight_ratio=0", "server.max_weight_ratio must be >= 1"),
        ("server.multi_krum=0.5", "server.multi_krum must be in"),
        ("server.multi_krum=-0.1", "server.multi_krum must be in"),
    ):
        with pytest.raises(ConfigError, match=message):
            compose([override])


def test_multi_krum_drops_per_cohort() -> None:
    """floor(fraction x n), capped where Krum's scores are defined (n >= 2f + 3)."""
    assert [krum_drops(n, 0.2) for n in (1, 3, 4, 5, 9, 10, 100)] == [0, 0, 0, 1, 1, 2, 20]
    assert krum_drops(5, 0.45) == 1 and krum_drops(7, 0.45) == 2 and krum_drops(10, 0.0) == 0


def _krum_by_hand(updates: list[torch.Tensor], drop: int) -> list[int]:
    n = len(updates)
    scores = []
    for i in range(n):
        d = sorted(float((updates[i] - updates[j]).square().sum()) for j in range(n) if j != i)
        scores.append(sum(d[: n - drop - 2]))
    return sorted(sorted(range(n), key=lambda i: (scores[i], i))[: n - drop])


def test_multi_krum_keeps_the_updates_the_definition_keeps() -> None:
    g = torch.Generator().manual_seed(3)
    start = random_adapter(g)
    for n, drop in ((5, 1), (7, 2), (9, 3), (10, 2)):
        payloads = [{k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) * (1 + i % 3) for k, v in start.items()}
                    for i in range(n)]  # fmt: skip
        flat = [torch.cat([(p[k].double() - start[k].double()).flatten() for k in sorted(start)]) for p in payloads]
        assert multi_krum(payloads, [start] * n, drop=drop) == _krum_by_hand(flat, drop)
    assert multi_krum(payloads, [start] * n, drop=0) == list(range(n))
    with pytest.raises(ValueError, match="n >= 2f \\+ 3"):
        multi_krum(payloads[:4], [start] * 4, drop=1)


def test_multi_krum_leaves_out_an_update_pointing_elsewhere_at_any_scale() -> None:
    """Four honest updates around a common direction; the fifth is that direction reversed, or a random
    one, at the honest norm or far above it: it is the one left out."""
    g = torch.Generator().manual_seed(1)
    start = random_adapter(g)
    common = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in start.items()}
    honest = [{k: start[k] + common[k] + 0.5 * torch.randn(v.shape, generator=g, dtype=v.dtype)
               for k, v in start.items()} for _ in range(4)]  # fmt: skip
    for scale in (1.0, 10.0):
        for attack in ({k: start[k] - scale * common[k] for k in start},
                       {k: start[k] + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) * 1.2
                        for k, v in start.items()}):  # fmt: skip
            for position in (0, 2, 4):
                payloads = [*honest]
                payloads.insert(position, attack)
                kept = multi_krum(payloads, [start] * 5, drop=1)
                assert kept == [i for i in range(5) if i != position]


def test_multi_krum_compares_heterogeneous_ranks_zero_padded() -> None:
    """Clients at ranks 2, 4, 2, 4, 2: the rank-4 factors compared with the rank-2 ones padded with zeros."""
    g = torch.Generator().manual_seed(2)
    base = {"m.lora_A": torch.randn(4, 6, generator=g), "m.lora_B": torch.randn(6, 4, generator=g)}

    def at_rank(r: int, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"m.lora_A": t["m.lora_A"][:r].clone(), "m.lora_B": t["m.lora_B"][:, :r].clone()}

    ranks = [2, 4, 2, 4, 2]
    starts = [at_rank(r, {k: torch.zeros_like(v) for k, v in base.items()}) for r in ranks]
    payloads = [at_rank(r, {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}) for r in ranks]
    payloads[3] = at_rank(4, {k: -v for k, v in base.items()})
    assert multi_krum(payloads, starts, drop=1) == [0, 1, 2, 4]


def test_multi_krum_is_on_by_default_and_refused_under_user_level_dp() -> None:
    assert compose([])[0].server.multi_krum == 0.2
    user = ["model=tiny", "privacy=user", "privacy.epsilon=8", "clients=200", "clients_per_round=20"]
    assert compose(user)[0].server.multi_krum == 0.0  # DP-FedAvg: every clipped update summed
    with pytest.raises(ConfigError, match=r"server\.multi_krum=0\.2 is refused under privacy=user"):
        compose([*user, "server.multi_krum=0.2"])
    assert compose(["server.multi_krum=0"])[0].server.multi_krum == 0.0
