"""Whether a run's privacy budget can be met: one check that ``fedlora simulate`` and the deployed
ServerApp both make before round 1, and the server's user-level plan.

Sample level (``privacy=dp``): every client's DP-SGD plan is calibrated (its noise multiplier for
``privacy.epsilon`` over the rounds the schedule gives it); user level (``privacy=user``): the
server's plan. An impossible budget is a :class:`~fedlora.config.errors.ConfigError`, one line.
"""

from __future__ import annotations

from collections.abc import Callable

from fedlora.config.errors import ConfigError
from fedlora.config.run import RunConfig
from fedlora.privacy.accounting import ClientPlan, user_plan
from strategies import user_dp


def user_dp_plan(cfg: RunConfig) -> tuple[ClientPlan, float, float | None]:
    """privacy=user: the server's accountant plan and the update's share of the noise, (plan, z_update,
    sigma_count); sigma_count None without adaptive clipping."""
    m = cfg.sampled_per_round
    plan = user_plan(cfg.privacy, clients=cfg.clients, expected=m, rounds=cfg.rounds)
    z = plan.noise_multiplier
    count = None
    if cfg.privacy.adaptive_clip:
        count = cfg.privacy.clip_count_stddev or user_dp.default_count_stddev(m, z)
    try:
        z_update = user_dp.update_noise_multiplier(z, count)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return plan, z_update, count


def check_budget(cfg: RunConfig, plan_for: Callable[[int], ClientPlan] | None = None) -> list[ClientPlan]:
    """Calibrate the run's privacy now, so that a budget that cannot be met fails before round 1.

    ``plan_for(partition_id)``: a client's DP-SGD plan (``privacy=dp``; the data's partition sizes
    decide it). Returns the sample-level plans (empty for other levels)."""
    if cfg.privacy.user_level:
        user_dp_plan(cfg)
        return []
    if cfg.privacy.enabled:
        if plan_for is None:
            raise ValueError("privacy=dp: check_budget needs each client's plan (plan_for)")
        return [plan_for(pid) for pid in range(cfg.clients)]
    return []
