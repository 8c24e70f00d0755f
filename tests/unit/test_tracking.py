"""TensorBoard and MLflow get the rows metrics.csv gets; read back with each library's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.commands.centralised import run_centralised
from fedlora.config.compose import compose
from fedlora.config.run import ConfigError
from fedlora.outputs.metrics import read_metrics
from fedlora.outputs.tracking import tracking_uri
from tests.conftest import TINY


def test_tensorboard_and_mlflow_hold_every_round_of_metrics_csv(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _ = compose([*TINY, "clients=2", "rounds=2", "data.synthetic_test=16", "trackers=[tensorboard,mlflow]"])
    run_centralised(cfg, tmp_path)  # the same MetricsLog as a simulation, without starting Ray
    rows = read_metrics(tmp_path / "metrics.csv")
    accuracy = [float(r["test_accuracy"]) for r in rows]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("test_accuracy")
    assert [e.step for e in scalars] == [0, 1, 2]
    assert [e.value for e in scalars] == pytest.approx(accuracy, abs=1e-5)

    client = MlflowClient(tracking_uri=tracking_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert sorted((m.step, round(m.value, 5)) for m in history) == [
        (i, pytest.approx(a, abs=1e-5)) for i, a in enumerate(accuracy)
    ]
    assert run.data.params["rounds"] == "2" and run.info.status == "FINISHED"


def test_an_unknown_tracker_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown tracker 'wandb'"):
        compose(["trackers=[wandb]"])
