"""The config groups of the federation: privacy (sample- or user-level DP) and the server.

Hydra composes ``conf/privacy/*.yaml`` and ``conf/server/*.yaml`` over these (via
:class:`fedlora.config.run.RunConfig`); every value is checked in ``__post_init__``.
"""

# OmegaConf's structured configs understand typing.Optional/List/Dict, not PEP 604/585.
# ruff: noqa: UP045

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fedlora.config.errors import ConfigError, require
from strategies.robust import AGGREGATIONS
from strategies.server_opt import ServerOptConfig

PRIVACY = ("none", "dp", "user")
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")  # Opacus's "ew" takes positional inputs only: not HF models


@dataclass
class PrivacyConfig:
    """Differential privacy: ``name=dp`` (sample-level DP-SGD on every client, Opacus) or
    ``name=user`` (user-level DP-FedAvg on the server, :mod:`strategies.user_dp`); the two
    levels are one choice, never combined.

    ``privacy=user``: each client takes part in a round with probability q =
    clients_per_round / clients (drawn by the server from private randomness); its update
    (over everything the strategy averages) is clipped to ``clip_norm`` (the initial bound
    when ``adaptive_clip``: it then follows the ``target_quantile`` of the update norms
    at rate ``clip_lr``, from a count noised by ``clip_count_stddev``, null: max(m / 20, z));
    the server adds Gaussian noise to the sum and divides by the expected cohort m. epsilon
    and delta (null: min(1 / (10 N), 1e-5)) are for one whole client's data over the run.

    Give ``epsilon`` (the noise multiplier is then calibrated per client for all the
    rounds it is scheduled to take part in) or ``noise_multiplier`` (epsilon is then
    only reported), or both (the run is refused if that noise cannot keep the budget).
    ``delta`` null: min(1 / (10 n_k), 1e-5) for a client with n_k examples.

    What the guarantee rests on (the noise, the Poisson batch masks, Fed-SB's init
    subsample) is drawn from operating-system entropy in the client process, never
    from the run seed. ``unsafe_seeded_randomness`` derives it from the seed instead,
    so that tests can compare runs: anyone who knows the config can then remove the
    noise, so such a run is marked NOT PRIVATE wherever it is reported.
    ``train.batch_size`` is the logical batch of a DP-SGD step (its expected size under
    Poisson sampling: each record is in with probability 1 / ceil(n_k / batch_size));
    ``max_physical_batch_size`` cuts it into physical batches that fit in memory
    (Opacus's ``BatchMemoryManager``), one optimizer step and one accountant step per
    logical batch.
    ``public_counts``: the clients' example counts are public knowledge, so DP
    replies may carry them for ``strategy.weighting=examples`` (default: they do not,
    and clients are weighted uniformly).
    ``label_noise``: with ``train.logit_adjustment`` under DP the client's label prior
    comes from its label counts plus Gaussian noise of this std (one record changes one
    count by 1: the noise multiplier of that release), drawn afresh and charged to its
    ledger every round it trains.
    """

    name: str = "none"
    epsilon: Optional[float] = None
    delta: Optional[float] = None
    noise_multiplier: Optional[float] = None
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"
    poisson: bool = True
    max_physical_batch_size: Optional[int] = None
    public_counts: bool = False
    label_noise: float = 50.0
    unsafe_seeded_randomness: bool = False
    # privacy=user (user-level DP-FedAvg, strategies.user_dp): the bound on a client's update
    clip_norm: float = 1.0
    adaptive_clip: bool = True
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clip_count_stddev: Optional[float] = None

    def __post_init__(self) -> None:
        require(self.name in PRIVACY, f"unknown privacy {self.name!r}; choose from {list(PRIVACY)}")
        require(self.epsilon is None or self.epsilon > 0, f"privacy.epsilon must be > 0, got {self.epsilon}")
        require(self.delta is None or 0 < self.delta < 1, f"privacy.delta must be in (0, 1), got {self.delta}")
        require(
            self.noise_multiplier is None or self.noise_multiplier >= 0,
            f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier}",
        )
        require(self.max_grad_norm > 0, f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}")
        require(self.accountant in ACCOUNTANTS, f"privacy.accountant must be one of {list(ACCOUNTANTS)}")
        require(
            self.grad_sample_mode in GRAD_SAMPLE_MODES,
            f"privacy.grad_sample_mode must be one of {list(GRAD_SAMPLE_MODES)}",
        )
        require(
            self.max_physical_batch_size is None or self.max_physical_batch_size >= 1,
            "privacy.max_physical_batch_size must be >= 1 or null",
        )
        require(self.label_noise > 0, f"privacy.label_noise must be > 0, got {self.label_noise}")
        require(self.clip_norm > 0, f"privacy.clip_norm must be > 0, got {self.clip_norm}")
        require(0 < self.target_quantile < 1, f"privacy.target_quantile must be in (0, 1), got {self.target_quantile}")
        require(self.clip_lr >= 0, f"privacy.clip_lr must be >= 0, got {self.clip_lr}")
        require(
            self.clip_count_stddev is None or self.clip_count_stddev > 0,
            f"privacy.clip_count_stddev must be > 0 or null, got {self.clip_count_stddev}",
        )
        if self.enabled or self.user_level:
            require(
                self.epsilon is not None or self.noise_multiplier is not None,
                f"privacy={self.name} needs privacy.epsilon (a budget) or privacy.noise_multiplier",
            )
        if self.enabled:
            require(
                self.poisson,
                "privacy.poisson=false is refused under privacy=dp: the accountant assumes Poisson-sampled "
                "batches, so epsilon would not be a guarantee",
            )

    @property
    def enabled(self) -> bool:
        """Sample-level DP-SGD on the clients (``privacy=dp``)."""
        return self.name == "dp"

    @property
    def user_level(self) -> bool:
        """User-level DP-FedAvg on the server (``privacy=user``)."""
        return self.name == "user"

    @property
    def any(self) -> bool:
        """Either level of differential privacy."""
        return self.enabled or self.user_level


SECURE_AGGREGATIONS = ("none", "secaggplus")
MOD_RANGE = 2**32  # Flower's SecAgg+ modulus: a cohort's quantised values must sum below it


@dataclass
class ServerConfig:
    """The ServerApp's optimiser and tolerance of faults, the same in simulation and deployment.

    ``optimizer`` (none | momentum | adam | yogi | adagrad) steps from the current state
    towards the strategy's aggregate with ``lr``, ``momentum``, ``beta1``, ``beta2``,
    ``tau`` (:mod:`strategies.server_opt`; ``lr`` null: 1, or 0.01 for the adaptive ones).

    A round aggregates the replies that arrive within ``round_timeout`` seconds (and,
    with ``straggler_factor``, once half the nodes replied after t s, within
    max(60, factor x t) s more: a dead node is answered for by Flower within about a
    minute, so this bounds what a live but silent node costs; deployments only: in a
    simulation every node answers) and pass validation, if
    there are at least ``min_replies`` of them; otherwise the
    global adapter is left unchanged for that round. The run waits ``node_timeout`` s for
    every client's node, then starts with those connected if they are ``min_nodes`` or
    more (null: all); the others join when they connect. A reply is rejected when its
    tensors do not have the keys and shapes the strategy expects from that client,
    hold NaN or Inf, or (with ``max_update_norm``) when the L2 norm of what it
    changes, over all its tensors, exceeds that bound. ``resume``: continue from
    ``output_dir``'s checkpoint when there is one.

    No client can outweigh the rest (:mod:`strategies.robust`): each accepted update is
    scaled down to at most ``update_clip`` times the round's lower median update norm
    (null: off); example counts used as weights are the server's own where it knows the
    partition, else capped at ``max_weight_ratio`` times the round's lower median count;
    ``multi_krum`` (a fraction f/n; null: 0.2, or 0 under ``privacy=user``) leaves out the
    floor(f/n x n) updates farthest from the others each round, as Multi-Krum scores them, when
    n >= 2f + 3 (so from five replies on); ``aggregation`` (mean | trimmed_mean | median,
    trimming ``trim_fraction`` at each end) is the coordinate-wise combination of whatever the
    strategy averages.

    ``secure_aggregation`` (none | secaggplus): with secaggplus, each round's updates reach the
    server only as Flower's SecAgg+ masked vectors, whose sum it unmasks
    (:mod:`fedlora.flower.secure`); ``secagg_num_shares`` and ``secagg_reconstruction_threshold``
    are Flower's ``num_shares`` and ``reconstruction_threshold`` (a float: a fraction of the cohort,
    of the shares), ``secagg_clipping_range`` and ``secagg_quantization_range`` its quantiser's.
    """

    min_replies: int = 1
    round_timeout: float = 3600.0
    straggler_factor: Optional[float] = 3.0
    node_timeout: float = 600.0
    min_nodes: Optional[int] = None
    max_update_norm: Optional[float] = None
    update_clip: Optional[float] = 10.0
    max_weight_ratio: float = 10.0
    multi_krum: Optional[float] = None
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    secure_aggregation: str = "none"
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.67
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    resume: bool = False
    optimizer: str = "none"
    lr: Optional[float] = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        try:
            self.opt  # noqa: B018 - validates the optimiser's settings
        except ValueError as err:
            raise ConfigError(str(err)) from None
        require(self.min_replies >= 1, f"server.min_replies must be >= 1, got {self.min_replies}")
        require(self.round_timeout > 0, "server.round_timeout must be > 0 (seconds)")
        require(
            self.straggler_factor is None or self.straggler_factor >= 1,
            f"server.straggler_factor must be >= 1 or null, got {self.straggler_factor}",
        )
        require(self.node_timeout > 0, "server.node_timeout must be > 0 (seconds)")
        require(self.min_nodes is None or self.min_nodes >= 1, f"server.min_nodes must be >= 1 or null, got "
                f"{self.min_nodes}")  # fmt: skip
        require(
            self.update_clip is None or self.update_clip >= 1,
            f"server.update_clip must be >= 1 (a multiple of the round's median update norm) or null, "
            f"got {self.update_clip}",
        )
        require(
            self.multi_krum is None or 0 <= self.multi_krum < 0.5,
            f"server.multi_krum must be in [0, 0.5) (the fraction of each round's updates left out) or null, "
            f"got {self.multi_krum}",
        )
        require(self.max_weight_ratio >= 1, f"server.max_weight_ratio must be >= 1, got {self.max_weight_ratio}")
        require(
            self.aggregation in AGGREGATIONS,
            f"unknown server.aggregation {self.aggregation!r}; choose from {list(AGGREGATIONS)}",
        )
        require(0 <= self.trim_fraction < 0.5, f"server.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        require(
            self.secure_aggregation in SECURE_AGGREGATIONS,
            f"unknown server.secure_aggregation {self.secure_aggregation!r}; choose from {list(SECURE_AGGREGATIONS)}",
        )
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        require(
            (0 < shares <= 1) or (shares > 2 and shares == int(shares)),
            f"server.secagg_num_shares must be a fraction in (0, 1] or a whole number > 2, got {shares}",
        )
        require(
            (0 < threshold <= 1)
            or (threshold >= 2 and threshold == int(threshold) and (shares <= 1 or threshold < shares)),
            f"server.secagg_reconstruction_threshold must be a fraction in (0, 1] or a whole number >= 2 below "
            f"server.secagg_num_shares, got {threshold}",
        )
        require(self.secagg_clipping_range > 0, f"server.secagg_clipping_range must be > 0, got "
                f"{self.secagg_clipping_range}")  # fmt: skip
        require(
            0 < self.secagg_quantization_range <= 2**24,
            "server.secagg_quantization_range must be in (0, 2^24]: Flower's masks are taken modulo 2^32, which "
            f"must hold the sum of a cohort's quantised values, got {self.secagg_quantization_range}",
        )
        require(
            self.max_update_norm is None or self.max_update_norm > 0,
            f"server.max_update_norm must be > 0 or null, got {self.max_update_norm}",
        )

    @property
    def secure(self) -> bool:
        """Whether the server sees only the sum of each round's updates (``secure_aggregation``)."""
        return self.secure_aggregation != "none"

    @property
    def opt(self) -> ServerOptConfig:
        """The server optimiser's settings (pure math: :mod:`strategies.server_opt`)."""
        return ServerOptConfig(self.optimizer, self.lr, self.momentum, self.beta1, self.beta2, self.tau)
