"""The interval math every comparison prints: t intervals, paired differences, and when an ordering may be stated."""

from __future__ import annotations

import math

import pytest

from fedlora.outputs.stats import Interval, paired_difference, t_interval, verdict


def test_a_t_interval_is_mean_plus_minus_t_times_the_standard_error() -> None:
    # 0.80, 0.82, 0.84: mean 0.82, s = 0.02, s/sqrt(3) = 0.011547; t_{0.975, 2} = 4.302653
    iv = t_interval([0.80, 0.82, 0.84])
    assert iv.n == 3 and iv.mean == pytest.approx(0.82, abs=1e-12)
    assert iv.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert iv.low < 0.82 < iv.high


def test_more_seeds_narrow_the_interval_and_t_exceeds_the_normal_quantile() -> None:
    few, many = t_interval([0.8, 0.9]), t_interval([0.8, 0.9] * 10)
    assert many.half_width < few.half_width
    # with two values the half-width is t_{0.975,1} = 12.706 standard errors, far above 1.96
    assert few.half_width == pytest.approx(12.7062 * (0.1 / math.sqrt(2)) / math.sqrt(2), rel=1e-4)


def test_one_value_has_no_interval_and_none_are_left_out() -> None:
    one = t_interval([0.7])
    assert (one.low, one.high, one.n) == (0.7, 0.7, 1) and not one.excludes_zero()
    assert one.format() == "0.700 (n=1)"
    assert t_interval([0.7, float("nan"), None]).n == 1  # type: ignore[list-item]
    assert t_interval([]).n == 0


def test_a_paired_difference_uses_only_the_seeds_both_have() -> None:
    a = {0: 0.85, 1: 0.86, 2: 0.84, 3: 0.99}
    b = {0: 0.80, 1: 0.82, 2: 0.81}
    diff = paired_difference(a, b)
    assert diff.n == 3 and diff.mean == pytest.approx((0.05 + 0.04 + 0.03) / 3)
    assert diff.excludes_zero()  # every seed favours a by 3-5 points


def test_the_verdict_states_an_ordering_only_when_the_interval_excludes_zero() -> None:
    ahead = verdict("fed_sb", "fedavg", Interval(0.02, 0.01, 0.03, 3), what="at epsilon 1")
    assert ahead.startswith("fed_sb - fedavg at epsilon 1: +2.0 points, 95% CI [+1.0, +3.0], 3 paired seeds")
    assert ahead.endswith("fed_sb is ahead")
    unclear = verdict("fed_sb", "fedavg", Interval(0.008, -0.004, 0.020, 3))
    assert unclear.endswith("no difference measurable with 3 seeds")
    assert "no ordering" in verdict("a", "b", Interval(0.05, 0.05, 0.05, 1))
    behind = verdict("ffa_lora", "fedavg", Interval(-0.03, -0.05, -0.01, 5))
    assert behind.endswith("fedavg is ahead")
