"""strategies.robust: weights, update clipping and robust means that one client cannot drag."""

from __future__ import annotations

import pytest
import torch

from fedlora.config.compose import compose
from fedlora.config.run import ConfigError
from strategies.robust import cap_counts, clip_updates, combiner, lower_median, median, trimmed_mean, update_norm
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
    ):
        with pytest.raises(ConfigError, match=message):
            compose([override])
