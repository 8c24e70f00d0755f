"""The resolve step: the values a config leaves null, filled from the rest of it.

A :class:`~fedlora.config.run.RunConfig` validates what the user gave; :func:`resolve` returns a copy
with what follows from it (the client lr, the weighting, the logit adjustment) and checks those.
It is idempotent: a resolved config resolves to itself, so the flat form Flower carries stays equal.
"""

from __future__ import annotations

import dataclasses

from fedlora.config.errors import require
from fedlora.config.run import RunConfig

DEFAULT_LR = 1e-3  # the clients' learning rate when neither train.lr nor the strategy's client_lr is set


def resolve(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its derived values filled (in this order: each reads the ones before)."""
    for step in (logit_adjustment, weighting, learning_rate, outlier_dropping):
        cfg = step(cfg)
    return cfg


def logit_adjustment(cfg: RunConfig) -> RunConfig:
    """``train.logit_adjustment`` null: 1 for classification (label skew is the federated default), 0 for
    causal LMs. Under DP the client's label counts are noised before use (``privacy.label_noise``) and
    the release is charged to its budget every round."""
    tau = cfg.train.logit_adjustment
    if tau is None:
        tau = 1.0 if cfg.task == "classification" else 0.0
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, logit_adjustment=tau))
    require(
        not (tau > 0 and cfg.task != "classification"),
        f"train.logit_adjustment is for task=classification (a label prior), not task={cfg.task}",
    )
    return cfg


def weighting(cfg: RunConfig) -> RunConfig:
    """``strategy.weighting`` null: by example counts, or uniform where no count may leave a client.

    Under ``privacy=dp`` a client's exact count is private (one record changes it), but with
    logit adjustment each round already releases its label counts noised (charged to its
    ledger), and their sum is a noised example count the client may send at no further cost:
    weighting by it is the default. Without logit adjustment (and without
    ``privacy.public_counts``) the weighting is uniform."""
    chosen, dp = cfg.strategy.weighting, cfg.privacy.enabled
    noised_counts = dp and bool(cfg.train.logit_adjustment) and cfg.privacy.label_noise > 0
    weighting = chosen
    if weighting is None:
        counts = not dp or cfg.privacy.public_counts or noised_counts
        weighting = "examples" if counts and not cfg.privacy.user_level else "uniform"
        cfg = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, weighting=weighting))
    require(
        not (cfg.privacy.user_level and weighting == "examples"),
        "strategy.weighting=examples is refused under privacy=user: DP-FedAvg weighs each client's clipped "
        "update equally, which is what bounds one client's influence",
    )
    require(
        not (dp and weighting == "examples" and not cfg.privacy.public_counts and not noised_counts),
        "strategy.weighting=examples under privacy=dp needs a protected count: the noised label counts of "
        "logit adjustment (train.logit_adjustment > 0), or counts declared public (privacy.public_counts=true); "
        "or use strategy.weighting=uniform",
    )
    return cfg


def learning_rate(cfg: RunConfig) -> RunConfig:
    """``train.lr`` null: the strategy's recommended client lr (``client_lr_dp`` under DP, ``client_lr``),
    else 1e-3."""
    if cfg.train.lr is None:
        dp = cfg.strategy.client_lr_dp if cfg.privacy.enabled else None
        lr = dp or cfg.strategy.client_lr or DEFAULT_LR
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr))
    require(cfg.train.min_lr <= cfg.train.lr, "train.min_lr must not exceed train.lr")
    return cfg


DEFAULT_MULTI_KRUM = 0.2  # one update in five left out each round (from five replies on)


def outlier_dropping(cfg: RunConfig) -> RunConfig:
    """``server.multi_krum`` null: 0.2, or 0 under ``privacy=user`` (DP-FedAvg's sensitivity is one clipped
    update; a selection that depends on every update would break it) and under secure aggregation (the
    server sees no single update)."""
    if cfg.server.multi_krum is None:
        fraction = 0.0 if cfg.privacy.user_level or cfg.server.secure else DEFAULT_MULTI_KRUM
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, multi_krum=fraction))
    return cfg
