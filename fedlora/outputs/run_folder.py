"""Every name in a run's folder, in one place, and which of them mean the folder holds a run.

A run writes ``metrics.csv``, ``server.log``, the checkpoint (and the server optimiser's moments beside
it), ``partitions.csv``, its config three ways (``config.yaml``; ``run_config.json``, the flat form;
Hydra's ``.hydra/``), the final ``adapter/`` and, with trackers, ``tensorboard/`` or ``mlflow.db``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.config.errors import ConfigError

if TYPE_CHECKING:
    from fedlora.config.run import RunConfig

METRICS = "metrics.csv"
SERVER_LOG = "server.log"
CHECKPOINT = "checkpoint.safetensors"
SERVER_OPTIMIZER = "server_optimizer.safetensors"  # the server optimiser's moments, beside the checkpoint
PARTITIONS = "partitions.csv"
CONFIG = "config.yaml"
RUN_CONFIG = "run_config.json"
HYDRA = ".hydra"  # Hydra's own record: config.yaml and overrides.yaml
HYDRA_OVERRIDES = "overrides.yaml"
ADAPTER_DIR = "adapter"
PERSONAL_DIR = "personal"  # personal/partition_<k>: client k's own model (FedSA-LoRA), written by its node
TENSORBOARD = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
# Inside an export (the adapter folder): fedlora's record of the model, task and labels.
EXPORT_META = "fedlora.json"
EXPORT_LABELS = "labels.json"
LOCK = ".fedlora.lock"  # held while a run writes the folder

# What a run writes in its folder: a folder holding any of these holds a run.
RUN_OUTPUTS = (
    METRICS, CHECKPOINT, SERVER_OPTIMIZER, ADAPTER_DIR, SERVER_LOG, PARTITIONS, CONFIG, RUN_CONFIG, HYDRA,
    TENSORBOARD, MLFLOW_DB, MLFLOW_ARTIFACTS,
)  # fmt: skip


def held_outputs(out: Path) -> list[str]:
    """The run outputs ``out`` already holds."""
    return [name for name in RUN_OUTPUTS if (out / name).exists()]


def write_partitions(out: Path, label_names: Sequence[str], counts: Sequence[Sequence[int]]) -> None:
    """``partitions.csv``: every client's example count and label counts."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [f"{i},{sum(row)}," + ",".join(map(str, row)) for i, row in enumerate(counts)]
    (out / PARTITIONS).write_text("\n".join(["client,examples," + ",".join(label_names), *rows]) + "\n")


def check_writable(out: Path) -> None:
    """``out`` can be made and written: its nearest existing ancestor is a folder we can write in (tried with a
    temporary file, which root's permission bypass would hide from ``os.access``). One line, before any work."""
    import tempfile

    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"output_dir {out}: {ancestor} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise ConfigError(f"output_dir {out} cannot be written ({ancestor}: {err.strerror})") from None


def inputs_at_risk(out: Path, inputs: Sequence[Path]) -> list[tuple[Path, str]]:
    """(input, the run output it is or lies in) for each of ``inputs`` that ``--overwrite`` would delete."""
    found = []
    for given in inputs:
        forms = {given.absolute(), given.resolve()}
        for name in held_outputs(out):
            target = out / name
            spans = {target.absolute()} | ({target.resolve()} if target.is_dir() and not target.is_symlink() else set())
            if any(f == t or t in f.parents for f in forms for t in spans):
                found.append((given, name))
                break
    return found


@contextmanager
def lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``out`` while a run writes it: a second run into the same folder gets a ConfigError
    instead of interleaving its metrics with the first's. The lock file (``.fedlora.lock``) is not a run output."""
    from filelock import FileLock, Timeout

    out.mkdir(parents=True, exist_ok=True)
    held = FileLock(str(out / LOCK), timeout=0)
    try:
        held.acquire()
    except Timeout:
        raise ConfigError(f"output_dir {out} is in use by another fedlora run; choose another output_dir") from None
    try:
        yield
    finally:
        held.release()


def check_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds another run, unless resuming from its checkpoint or told to overwrite."""
    held = held_outputs(out)
    if not held or overwrite or (resume and (out / CHECKPOINT).is_file()):
        return
    hint = "continue it with server.resume=true, " if (out / CHECKPOINT).is_file() else ""
    raise ConfigError(
        f"{out} already holds a run ({', '.join(held[:4])}); choose another output_dir, {hint}or pass --overwrite"
    )


def run_inputs(cfg: RunConfig) -> list[Path]:
    """The files a run reads that a user gave: its data, a calibration file (Fed-SB's init from a file)."""
    paths = [Path(cfg.data.path)] if cfg.data.path else []
    source = getattr(cfg.strategy, "init_source", "clients")
    return paths + ([Path(source)] if source and source != "clients" else [])


def check_overwrite(out: Path, *, inputs: Sequence[Path], resume: bool) -> None:
    """``--overwrite`` deletes the run outputs in ``out``: never a run's input, never the checkpoint it resumes."""
    for given, name in inputs_at_risk(out, inputs):
        raise ConfigError(
            f"--overwrite would delete this run's input {given} ({name} in {out}); move it or choose another output_dir"
        )
    if resume and (out / CHECKPOINT).is_file():
        raise ConfigError("server.resume=true with --overwrite would delete the checkpoint it resumes from; drop one")


def clear_outputs(out: Path) -> None:
    """Remove an earlier run's outputs (``--overwrite``), and nothing else of the folder."""
    import shutil

    for name in held_outputs(out):
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
