"""The typed run configuration: one RunConfig that validates what it is given, flattened for Flower.

Hydra composes ``conf/`` over the schema registered here (:func:`register_schema`):
the groups' dataclasses (:mod:`fedlora.config.groups`, :mod:`fedlora.config.federated`) and the
strategy's own frozen config (:mod:`strategies`). What a config leaves null is filled by the separate
resolve step (:func:`fedlora.config.resolve.resolve`, which ``compose`` applies); whether a privacy budget
can be met is :func:`fedlora.privacy.budget.check_budget`'s. Flower's run config carries scalars only;
``to_flat`` / ``from_flat`` give that form (:mod:`fedlora.config.flat`).
"""

# OmegaConf's structured configs understand typing.Optional/List/Dict, not PEP 604/585.
# ruff: noqa: UP006, UP035, UP045

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, List, Optional

from fedlora.config.federated import PrivacyConfig, ServerConfig
from fedlora.config.flat import Flat, flatten, unflatten
from fedlora.config.groups import (
    TASKS,
    TRACKERS,
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
        cls = get_strategy_class(self.strategy.name)
        require(
            self.server.optimizer in cls.server_optimizers,
            f"server.optimizer={self.server.optimizer} is refused for strategy={cls.name}: "
            f"{cls.server_optimizer_note} (choose from {list(cls.server_optimizers)})",
        )
        require(
            self.server.aggregation == "mean" or cls.robust_aggregation,
            f"server.aggregation={self.server.aggregation} is refused for strategy={cls.name}: {cls.robust_note}",
        )
        if self.privacy.user_level:
            self._check_user_level(cls)
        if self.server.secure:
            self._check_secure(cls)
        require(
            self.server.min_replies <= self.sampled_per_round,
            f"server.min_replies ({self.server.min_replies}) must not exceed the clients sampled per round "
            f"({self.sampled_per_round})",
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
            not self.server.multi_krum,
            f"server.multi_krum={self.server.multi_krum} is refused under privacy=user: which updates are left "
            "out would depend on every client's, so one client could change the sum by more than its clip",
        )
        require(
            not (self.strategy.name == "fed_sb" and getattr(self.strategy, "init_source", "") == "clients"),
            "strategy=fed_sb with privacy=user needs strategy.init_source=<a public calibration file>: the clients' "
            "round-0 gradients would be released outside the user-level guarantee",
        )

    def _check_secure(self, cls: type) -> None:
        """``server.secure_aggregation``: a server step that needs only the weighted mean, nothing of it that
        reads one update, and a cohort whose quantised sum fits Flower's modulus."""
        from fedlora.config.federated import MOD_RANGE
        from strategies import STRATEGIES

        key = f"server.secure_aggregation={self.server.secure_aggregation}"
        supported = sorted(name for name, c in STRATEGIES.items() if c.secure_aggregation)
        require(cls.secure_aggregation, f"{key} is refused for strategy={cls.name}: {cls.secure_note} "
                f"(supported: {supported})")  # fmt: skip
        for setting, on in (("server.aggregation", self.server.aggregation != "mean"),
                            ("server.multi_krum", bool(self.server.multi_krum)),
                            ("server.max_update_norm", self.server.max_update_norm is not None)):  # fmt: skip
            value = getattr(self.server, setting.split(".")[1])
            require(not on, f"{setting}={value} is refused with {key}: it reads each update, the server sees only "
                    "their sum")  # fmt: skip
        require(
            not (self.strategy.name == "fed_sb" and getattr(self.strategy, "init_source", "") == "clients"),
            f"strategy=fed_sb with {key} needs strategy.init_source=<a public calibration file>: the clients' "
            "round-0 gradients would reach the server one by one",
        )
        cohort = self.clients if self.privacy.user_level else self.sampled_per_round  # Poisson: up to every client
        require(
            cohort * self.server.secagg_quantization_range < MOD_RANGE,
            f"{key}: a cohort of up to {cohort} clients at server.secagg_quantization_range="
            f"{self.server.secagg_quantization_range} overflows Flower's modulus 2^32; lower the range",
        )
        require(cohort >= 2 or self.privacy.user_level, f"{key} needs at least 2 clients per round (a sum of one "
                "is that client's update)")  # fmt: skip

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
        return flatten(self)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_flat` (keys missing from ``flat`` take their defaults)."""
        return unflatten(cls, dict(flat), mappings=("strategy",))


def build_strategy_config(values: dict[str, Any]) -> StrategyConfig:
    """The strategy's own frozen config from a plain mapping; unknown keys are errors."""
    name = values.get("name")
    try:
        cls = get_strategy_class(str(name)).config_class
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        require(not unknown, f"unknown key(s) {unknown} for strategy={name}; known: {sorted(known)}")
        return unflatten(cls, values)  # coerces by field type (the flat form carries "" for None)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None


def register_schema() -> None:
    """Register RunConfig with Hydra's ConfigStore (called by the launcher, not at import)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
