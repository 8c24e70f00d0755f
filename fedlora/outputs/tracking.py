"""Experiment tracking beside metrics.csv: TensorBoard and MLflow, fed the same round rows.

``trackers=[tensorboard,mlflow]`` (either or both; extras ``pip install fedlora[tracking]``):

- ``tensorboard``: event files in ``<run>/tensorboard/`` (``tensorboard --logdir <run>``),
  one scalar per metrics.csv column per round, and the run's config as text;
- ``mlflow``: a SQLite store in ``<run>/mlflow.db`` (no server: ``mlflow ui
  --backend-store-uri sqlite:///<run>/mlflow.db``; MLflow 3 keeps its older plain-file
  store in maintenance mode and refuses it by default), experiment ``fedlora``, one run
  with the flat config as parameters and every column as a metric with the round as its step.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from fedlora.config.groups import TRACKERS  # noqa: F401 - the names, defined with the other choices
from fedlora.outputs.run_folder import MLFLOW_ARTIFACTS, MLFLOW_DB, TENSORBOARD


class Tracker(Protocol):
    def log(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def numeric(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's numbers (empty cells and text, like the NOT PRIVATE mark, are left out), without the round."""
    return {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, int | float) and v is not None}


class TensorBoard:
    def __init__(self, folder: Path, flat_config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in flat_config.items()))

    def log(self, row: Mapping[str, Any]) -> None:
        for name, value in numeric(row).items():
            self.writer.add_scalar(name, value, global_step=int(row["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, out: Path, flat_config: Mapping[str, Any], *, run_name: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri(out))
        experiment = self.client.get_experiment_by_name("fedlora")
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self.client.create_experiment("fedlora", artifact_location=(out / MLFLOW_ARTIFACTS).resolve().as_uri())
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in flat_config.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, row: Mapping[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        step = int(row["round"])
        metrics = [Metric(k, v, stamp, step) for k, v in numeric(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def tracking_uri(out: Path) -> str:
    """The MLflow store of the run folder ``out``."""
    return f"sqlite:///{(out / MLFLOW_DB).resolve()}"


def open_trackers(names: list[str], out: Path, flat_config: Mapping[str, Any]) -> list[Tracker]:
    """The trackers ``names`` asks for, writing under the run folder ``out``."""
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoard(out / TENSORBOARD, flat_config))
        elif name == "mlflow":
            trackers.append(MLflow(out, flat_config, run_name=out.name))
    return trackers
