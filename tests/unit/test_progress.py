"""Progress inside a round (fedlora.federation.progress): a simulation's clients report their local steps."""

from __future__ import annotations

import torch
from torch import nn

from fedlora.federation import progress, stopping
from fedlora.learning.train import cycle, train_steps


def test_clients_report_their_steps_and_the_console_sums_the_latest_round(monkeypatch) -> None:
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    progress.report(1, 10)  # no simulation (no stop file named): nowhere to write, no error
    with stopping.stop_file():
        assert progress.latest() is None
        with progress.client_round(1, 0):
            progress.report(10, 10)
        with progress.client_round(2, 3):
            progress.report(4, 10)
        with progress.client_round(2, 5):
            progress.report(10, 10)
        assert progress.latest() == (2, 14, 20)  # round 2's started clients; round 1 is over
        progress.report(7, 10)  # outside a client round: nothing
        assert progress.latest() == (2, 14, 20)
        folder = progress.folder()
        assert folder is not None
    assert not folder.exists()  # removed with the stop file, progress files and all


def test_a_client_writes_at_most_once_a_second_and_always_its_last_step(monkeypatch) -> None:
    monkeypatch.setattr(progress, "EVERY_S", 3600.0)
    with stopping.stop_file(), progress.client_round(1, 0):
        progress.report(1, 5)  # the first report is written
        assert progress.latest() == (1, 1, 5)
        progress.report(3, 5)  # within the second: skipped
        assert progress.latest() == (1, 1, 5)
        progress.report(5, 5)  # the last step: always
        assert progress.latest() == (1, 5, 5)


def test_the_training_loop_reports_its_steps() -> None:
    model = nn.Linear(3, 2)
    batches = cycle([{"input_ids": torch.randn(4, 3), "labels": torch.tensor([0, 1, 0, 1])}])

    def loss_fn(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch["input_ids"]), batch["labels"])

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with stopping.stop_file(), progress.client_round(4, 2):
        train_steps(model, batches, loss_fn=loss_fn, optimizer=optimizer, steps=7, device=torch.device("cpu"))
        assert progress.latest() == (4, 7, 7)
