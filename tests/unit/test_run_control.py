"""How a run is controlled: Ctrl-C reaching a simulation's clients within a layer
(fedlora.learning.train.stop_checks), the device a client process picks, what a simulation waits for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlora.federation import stopping
from fedlora.learning.train import stop_checks, train_steps


class Stack(nn.Module):
    """Three blocks in a ModuleList, as a transformer holds its layers."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.calls = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = input_ids.float()
        for layer in self.layers:
            self.calls += 1
            x = layer(x)
        return x.square().mean()


def hooks(model: Stack) -> int:
    return sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in model.layers)


def test_outside_a_simulation_nothing_is_hooked(monkeypatch) -> None:
    monkeypatch.delenv(stopping.STOP_FILE_ENV, raising=False)
    model = Stack()
    with stop_checks(model):
        assert hooks(model) == 0
    stopping.check_client()  # no stop file named: never raises


def test_the_stop_file_ends_a_forward_or_backward_pass_within_a_layer(monkeypatch, tmp_path) -> None:
    stop = tmp_path / "stop"
    monkeypatch.setenv(stopping.STOP_FILE_ENV, str(stop))
    model = Stack()
    with stop_checks(model):
        assert hooks(model) == 6
        loss = model(torch.ones(2, 4))  # no stop file yet: the pass runs
        stop.touch()  # Ctrl-C in the driver
        with pytest.raises(stopping.ClientStopped):
            loss.backward()  # stopped at the last block's backward, before any weight's gradient
        assert all(layer.weight.grad is None for layer in model.layers)
        model.calls = 0
        with pytest.raises(stopping.ClientStopped):
            model(torch.ones(2, 4))
        assert model.calls == 1  # the first block's check stopped it
    assert hooks(model) == 0  # removed on leaving


def test_a_round_stops_at_once_and_runs_whole_without_a_stop(monkeypatch, tmp_path) -> None:
    stop = tmp_path / "stop"
    monkeypatch.setenv(stopping.STOP_FILE_ENV, str(stop))
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = iter(lambda: {"input_ids": torch.ones(2, 4, dtype=torch.long)}, None)

    def loss_fn(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(batch["input_ids"])

    result = train_steps(model, batches, loss_fn=loss_fn, optimizer=opt, steps=3, device=torch.device("cpu"))
    assert result.steps == 3
    stop.touch()
    with pytest.raises(stopping.ClientStopped):
        train_steps(model, batches, loss_fn=loss_fn, optimizer=opt, steps=10**6, device=torch.device("cpu"))
    assert hooks(model) == 0


def test_a_process_given_gpus_it_cannot_use_trains_on_the_cpu_and_says_so(monkeypatch, caplog) -> None:
    """Ray sets CUDA_VISIBLE_DEVICES for a client with num_gpus (also for GPUs only declared, ray start
    --num-gpus on a CPU host); without a CUDA device torch cannot use them: CPU, one warning."""
    import logging

    from fedlora.learning.model import device_for_worker

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with caplog.at_level(logging.WARNING, logger="fedlora.learning.model"):
        assert device_for_worker() == torch.device("cpu")
    assert "given GPU(s) 1 (CUDA_VISIBLE_DEVICES) but torch sees no CUDA device" in caplog.text
    caplog.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # Ray hides GPUs from a client with num_gpus=0
    with caplog.at_level(logging.WARNING, logger="fedlora.learning.model"):
        assert device_for_worker() == torch.device("cpu")
    assert caplog.text == ""


def test_a_simulation_never_cuts_stragglers() -> None:
    """Ray answers for every simulated node, and queued clients finish far apart: the ServerApp of a
    simulation runs without server.straggler_factor, a deployed one with it."""
    from fedlora.config.compose import compose
    from fedlora.flower.simulation import simulated

    cfg, _ = compose(["model=tiny"])
    assert cfg.server.straggler_factor == 3.0
    assert simulated(cfg).server.straggler_factor is None
    assert simulated(cfg).server.round_timeout == cfg.server.round_timeout


def test_parallel_clients_declares_ray_that_many_clients_cpus() -> None:
    """Flower sizes its worker pool (one model copy each) to the clients that fit Ray's CPUs: capped, the
    local Ray is declared exactly ``parallel_clients`` clients' CPUs; uncapped, Ray counts the machine's."""
    from fedlora.config.compose import compose
    from fedlora.flower.simulation import ray_init_args

    assert "num_cpus" not in ray_init_args(compose(["model=tiny"])[0])
    capped = ray_init_args(compose(["simulation.parallel_clients=5", "simulation.num_cpus=0.4"])[0])
    assert (capped["num_cpus"], capped["address"]) == (2, "local")
    assert ray_init_args(compose(["simulation.ray_address=auto"])[0])["address"] == "auto"


@pytest.mark.parametrize("server_threads", [None, pytest.param(3, marks=pytest.mark.slow)])  # 3: a Ray run
def test_the_servers_evaluation_runs_on_server_threads_and_gives_them_back(
    monkeypatch, tmp_path, server_threads
) -> None:
    """The evaluation between rounds (no client trains then) on ``simulation.server_threads`` threads, null: the
    threads the server had; the rest of the server, and what comes after it, on those it had."""
    from fedlora.config.compose import compose
    from fedlora.flower.simulation import run_flower_simulation
    from fedlora.learning.worker import Worker
    from tests.conftest import TINY
    from tests.local_grid import run_in_process

    seen: list[int] = []
    real = Worker.evaluate

    def counting(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Worker, "evaluate", counting)
    placement = [] if server_threads is None else [f"simulation.server_threads={server_threads}"]
    cfg, _ = compose(
        [*TINY, "clients=2", "rounds=1", "train.personal_eval=false", *placement, f"output_dir={tmp_path}"]
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        if server_threads is None:
            run_in_process(cfg)
        else:  # through Ray: the App's run config has no simulation.* keys, the simulation hands it over
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
            run_flower_simulation(cfg)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen == [server_threads or 1] * 2  # rounds 0 and 1 (the clients' evaluations run in Ray's workers)
