"""The typed run configuration: one RunConfig, validated once, flattened for Flower.

Hydra composes ``conf/`` over the schema registered here (:func:`register_schema`):
the groups' dataclasses (:mod:`fedlora.config.groups`) and the strategy's own frozen config
(:mod:`strategies`). Flower's run config carries scalars only; ``to_flat`` /
``from_flat`` give that form (dotted keys, lists as "a,b", null as "").
"""

# OmegaConf's structured configs understand typing.Optional/List/Dict, not PEP 604/585.
# ruff: noqa: UP006, UP007, UP035, UP045

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from fedlora.config.federated import PrivacyConfig, ServerConfig
from fedlora.config.groups import (
    TASKS,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    PartitionConfig,
    RunFailed,
    SimulationConfig,
    TrainConfig,
    require,
)
from fedlora.outputs.tracking import TRACKERS
from strategies import StrategyConfig, get_strategy_class

__all__ = [
    "ConfigError",
    "DataConfig",
    "Flat",
    "LoraConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "RunConfig",
    "RunFailed",
    "ServerConfig",
    "SimulationConfig",
    "TrainConfig",
    "build_strategy_config",
    "register_schema",
]

Flat = Dict[str, typing.Union[bool, int, float, str]]
DEFAULT_LR = 1e-3  # the clients' learning rate when neither train.lr nor the strategy's client_lr is set


@dataclass
class RunConfig:
    """Everything one federated run needs, for simulation and deployment alike.

    ``clients_per_round``: a count (an integer >= 1) or a fraction of ``clients``
    (a number in (0, 1)).
    """

    strategy: Any = field(default_factory=lambda: {"name": "fedavg"})
    clients: int = 10
    clients_per_round: float = 0.5
    rounds: int = 3
    seed: int = 0
    output_dir: Optional[str] = None
    trackers: List[str] = field(default_factory=list)  # tensorboard, mlflow: beside metrics.csv
    task: str = "classification"  # classification | causal_lm (fedlora.learning.tasks)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def __post_init__(self) -> None:
        if isinstance(self.strategy, Mapping):
            self.strategy = build_strategy_config(dict(self.strategy))
        require(self.clients >= 1, f"clients must be >= 1, got {self.clients}")
        require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        cpr = self.clients_per_round
        require(cpr > 0, f"clients_per_round must be > 0, got {cpr}")
        require(
            cpr < 1 or float(cpr).is_integer(),
            f"clients_per_round must be an integer count or a fraction in (0, 1), got {cpr}",
        )
        require(
            cpr <= self.clients,
            f"clients_per_round ({cpr:g}) must not exceed clients ({self.clients})",
        )
        require(self.task in TASKS, f"unknown task {self.task!r}; choose from {list(TASKS)}")
        require(
            not (self.task == "causal_lm" and self.privacy.enabled and self.privacy.grad_sample_mode == "ghost"),
            "privacy.grad_sample_mode=ghost is not supported for task=causal_lm (use hooks or functorch)",
        )
        require(
            not (self.task == "causal_lm" and self.model.pooling != "cls"),
            f"task=causal_lm has no pooling: model.pooling={self.model.pooling} is for encoder classifiers "
            f"(model {self.model.name!r}); use a causal LM (model=smollm2, model=tiny_llama) or task=classification",
        )
        for name in self.trackers:
            require(name in TRACKERS, f"unknown tracker {name!r}; choose from {list(TRACKERS)}")
            module = {"tensorboard": "tensorboard", "mlflow": "mlflow"}[name]
            require(
                importlib.util.find_spec(module) is not None,
                f"trackers=[{name}] needs the {module} package: pip install 'fedlora[tracking]'",
            )
        self._resolve_logit_adjustment()
        self._resolve_weighting()
        self._resolve_lr()
        cls = get_strategy_class(self.strategy.name)
        require(
            self.server.optimizer in cls.server_optimizers,
            f"server.optimizer={self.server.optimizer} is refused for strategy={cls.name}: "
            f"{cls.server_optimizer_note} (choose from {list(cls.server_optimizers)})",
        )
        require(
            self.server.aggregation == "mean" or cls.robust_aggregation,
            f"server.aggregation={self.server.aggregation} is refused for strategy={cls.name}: it combines the "
            "clients' adapters exactly (stacking or an exact residual), not by an average",
        )
        if self.privacy.user_level:
            self._check_user_level(cls)
        require(
            self.server.min_replies <= self.sampled_per_round,
            f"server.min_replies ({self.server.min_replies}) must not exceed the clients sampled per round "
            f"({self.sampled_per_round})",
        )

    def _resolve_lr(self) -> None:
        """``train.lr`` null: the strategy's recommended client lr (``client_lr_dp`` under DP, ``client_lr``),
        else 1e-3."""
        if self.train.lr is None:
            dp = self.strategy.client_lr_dp if self.privacy.enabled else None
            lr = dp or self.strategy.client_lr or DEFAULT_LR
            self.train = dataclasses.replace(self.train, lr=lr)
        require(self.train.min_lr <= self.train.lr, "train.min_lr must not exceed train.lr")

    def _resolve_logit_adjustment(self) -> None:
        """``train.logit_adjustment`` null: 1 for classification (label skew is the federated default), 0 for
        causal LMs. Under DP the client's label counts are noised before use (``privacy.label_noise``) and
        the release is charged to its budget every round."""
        tau = self.train.logit_adjustment
        if tau is None:
            tau = 1.0 if self.task == "classification" else 0.0
            self.train = dataclasses.replace(self.train, logit_adjustment=tau)
        require(
            not (tau > 0 and self.task != "classification"),
            f"train.logit_adjustment is for task=classification (a label prior), not task={self.task}",
        )

    def _check_user_level(self, cls: type) -> None:
        """``privacy=user``: a strategy whose server step is an average, nothing else data-dependent
        released, and a noise that the budget allows (calibrated here, so a refusal comes first)."""
        from strategies import STRATEGIES

        supported = sorted(name for name, c in STRATEGIES.items() if c.user_level_dp)
        require(
            cls.user_level_dp,
            f"privacy=user is refused for strategy={cls.name}: {cls.user_dp_note} (supported: {supported})",
        )
        require(
            self.server.aggregation == "mean",
            f"server.aggregation={self.server.aggregation} is refused under privacy=user: DP-FedAvg's noise is "
            "calibrated to a sum of clipped updates, not to a robust mean",
        )
        require(
            not (self.strategy.name == "fed_sb" and getattr(self.strategy, "init_source", "") == "clients"),
            "strategy=fed_sb with privacy=user needs strategy.init_source=<a public calibration file>: the clients' "
            "round-0 gradients would be released outside the user-level guarantee",
        )
        self.user_dp_plan()  # ConfigError when the budget cannot be met

    def user_dp_plan(self):
        """privacy=user: the server's accountant plan and the update's share of the noise, (plan, z_update,
        sigma_count); sigma_count None without adaptive clipping."""
        from fedlora.privacy.accounting import user_plan
        from strategies import user_dp

        m = self.sampled_per_round
        plan = user_plan(self.privacy, clients=self.clients, expected=m, rounds=self.rounds)
        z = plan.noise_multiplier
        count = None
        if self.privacy.adaptive_clip:
            count = self.privacy.clip_count_stddev or user_dp.default_count_stddev(m, z)
        try:
            z_update = user_dp.update_noise_multiplier(z, count)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return plan, z_update, count

    def _resolve_weighting(self) -> None:
        """``strategy.weighting`` null: by example counts, or uniform where no count may leave a client.

        Under ``privacy=dp`` a client's exact count is private (one record changes it), but with
        logit adjustment each round already releases its label counts noised (charged to its
        ledger), and their sum is a noised example count the client may send at no further cost:
        weighting by it is the default. Without logit adjustment (and without
        ``privacy.public_counts``) the weighting is uniform."""
        weighting, dp = self.strategy.weighting, self.privacy.enabled
        noised_counts = dp and bool(self.train.logit_adjustment) and self.privacy.label_noise > 0
        if weighting is None:
            counts = not dp or self.privacy.public_counts or noised_counts
            weighting = "examples" if counts and not self.privacy.user_level else "uniform"
            self.strategy = dataclasses.replace(self.strategy, weighting=weighting)
        require(
            not (self.privacy.user_level and weighting == "examples"),
            "strategy.weighting=examples is refused under privacy=user: DP-FedAvg weighs each client's clipped "
            "update equally, which is what bounds one client's influence",
        )
        require(
            not (dp and weighting == "examples" and not self.privacy.public_counts and not noised_counts),
            "strategy.weighting=examples under privacy=dp needs a protected count: the noised label counts of "
            "logit adjustment (train.logit_adjustment > 0), or counts declared public (privacy.public_counts=true); "
            "or use strategy.weighting=uniform",
        )

    @property
    def lora_alpha(self) -> float:
        """The LoRA alpha the run uses: ``lora.alpha`` unless the strategy sets its own (FFA-LoRA, Fed-SB)."""
        cls = get_strategy_class(self.strategy.name)
        return cls.lora_alpha(self.strategy, rank=self.lora.rank, alpha=self.lora.alpha)

    @property
    def model_rank(self) -> int:
        """The adapter rank the model is built with: ``lora.rank`` unless the strategy's clients differ (FLoRA)."""
        cls = get_strategy_class(self.strategy.name)
        return cls.model_rank(self.strategy, rank=self.lora.rank)

    @property
    def scaling(self) -> float:
        """s = alpha / r with the run's alpha and rank: the same for every client."""
        return self.lora_alpha / self.model_rank

    @property
    def sampled_per_round(self) -> int:
        """How many clients train each round."""
        cpr = self.clients_per_round
        return int(cpr) if cpr >= 1 else max(1, round(cpr * self.clients))

    def with_clients(self, clients: int) -> RunConfig:
        """This config for a federation of ``clients`` (a count of clients per round is capped at it)."""
        if clients == self.clients:
            return self
        cpr = self.clients_per_round if self.clients_per_round < 1 else min(self.clients_per_round, clients)
        return dataclasses.replace(self, clients=clients, clients_per_round=cpr)

    def to_flat(self) -> Flat:
        """Scalars only, dotted keys: what Flower's run config can carry."""
        return _flatten(self)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_flat` (keys missing from ``flat`` take their defaults)."""
        return _unflatten(cls, dict(flat), prefix="")


def build_strategy_config(values: dict[str, Any]) -> StrategyConfig:
    """The strategy's own frozen config from a plain mapping; unknown keys are errors."""
    name = values.get("name")
    try:
        cls = get_strategy_class(str(name)).config_class
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        require(not unknown, f"unknown key(s) {unknown} for strategy={name}; known: {sorted(known)}")
        return _unflatten(cls, values, prefix="")  # coerces by field type (the flat form carries "" for None)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None


# -- flat form ------------------------------------------------------------------
_LIST_SEP = ","


def _flatten(obj: Any, prefix: str = "") -> Flat:
    flat: Flat = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            flat.update(_flatten(value, f"{key}."))
        elif isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, (list, tuple)):
            flat[key] = _LIST_SEP.join(str(v) for v in value)
        elif value is None:
            flat[key] = ""  # Flower has no null; "" is read back as None for Optional fields
        else:
            flat[key] = value
    return flat


def _unflatten(cls: type, flat: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        origin = typing.get_origin(hint)
        if (f.name == "strategy" and cls is RunConfig) or origin in (dict, Dict):  # a mapping of its own keys
            if sub := {k[len(key) + 1 :]: v for k, v in flat.items() if k.startswith(f"{key}.")}:
                kwargs[f.name] = sub
        elif dataclasses.is_dataclass(hint):
            kwargs[f.name] = _unflatten(hint, flat, f"{key}.")
        elif key in flat:
            kwargs[f.name] = _value(hint, flat[key])
    return cls(**kwargs)


def _value(hint: Any, value: Any) -> Any:
    """A flat value as the field's type: "" is None for optional fields, "a,b" a list."""
    origin = typing.get_origin(hint)
    optional = origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional and value in ("", None):
        return None
    if origin in (list, List):
        return [v for v in str(value).split(_LIST_SEP) if v]
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    return _coerce(base, value)


def _coerce(kind: Any, value: Any) -> Any:
    if kind is bool and isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return kind(value) if kind in (int, float, str, bool) else value


def register_schema() -> None:
    """Register RunConfig with Hydra's ConfigStore (called by the launcher, not at import)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
