"""A simulation on a Ray cluster of several hosts (network namespaces), and clients placed on declared GPUs.

Each test builds its own cluster with :mod:`tools.ray_cluster` (a head with no CPUs
of its own at 10.77.0.1, workers at 10.77.0.11, ...; docs/deployment.md's recipe), runs
``fedlora simulate ... simulation.ray_address=10.77.0.1:6379`` from the head's
namespace, and removes every process and namespace afterwards. Where each client
ran comes from the server log (a simulated client's reply says its Ray node,
process, GPUs and device). Skipped where namespaces cannot be made.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.config.compose import compose
from tests.deployment.test_deployment import assert_same_run, finished
from tests.deployment.test_netns import TINY, server_log, table, wait
from tests.local_grid import run_in_process
from tools import netns
from tools.ray_cluster import HEAD, RayCluster

# Its own namespaces and Ray files; with tests/deployment/test_netns.py on one pytest-xdist worker, so that the
# two namespaced harnesses never load the 2 cores at once
pytestmark = [pytest.mark.slow, pytest.mark.deployment, pytest.mark.xdist_group("netns")]
RUN_S = 300
CLIENT = re.compile(r"partition (\d+) \[pid (\d+)(?:, GPU ([\d,]+))?, (\w+)\]")


@pytest.fixture
def cluster(tmp_path):
    """``cluster(workers, cpus, gpus)``: a running cluster, removed at the end of the test."""
    try:
        netns.check_available()
    except netns.Unavailable as err:
        pytest.skip(f"network namespaces unavailable: {err}")
    made: list[RayCluster] = []

    def make(workers: int, *, cpus: int = 1, gpus: float = 0) -> RayCluster:
        c = RayCluster(tmp_path / f"cluster{len(made)}", nodes=workers, worker_cpus=cpus, worker_gpus=gpus)
        made.append(c)
        c.up()
        return c

    yield make
    for c in made:
        namespaces = [h.namespace for h in c.hosts.values()]
        c.down()
        assert not set(namespaces) & set(netns.ip("netns", "list").stdout.split())
        assert not c.temp_dir.exists()


def placements(out: Path) -> dict[int, dict[str, list[tuple[int, int, str | None, str]]]]:
    """round -> host -> (partition, pid, GPUs, device) of each client that ran there, from server.log."""
    found: dict[int, dict[str, list]] = {}
    for m in re.finditer(r"round (\d+): clients ran on (.*)", server_log(out)):
        for part in m.group(2).split("; "):
            host, clients = part.split(": ", 1)
            found.setdefault(int(m.group(1)), {})[host] = [
                (int(p), int(pid), gpus, device) for p, pid, gpus, device in CLIENT.findall(clients)
            ]
    return found


def launch(c: RayCluster, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(c.simulate_argv(overrides), env=c.env(HEAD), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def test_a_run_on_three_hosts_equals_one_host_places_clients_on_gpus_and_outlives_a_dead_worker(
    cluster, tmp_path
) -> None:
    """Two workers, each declaring one GPU (``ray start --num-gpus 1`` on this CPU host), and
    ``simulation.num_gpus=0.5``: four client processes at once, two on each worker's GPU, all four GPU halves
    taken while they live, each training on the CPU (torch sees no CUDA). Then one worker host dies: its
    clients' messages run again on the other (Flower's pool alone would keep the dead actors and lose clients
    every round), every round has all its replies, and metrics and adapter equal a one-host run."""
    c = cluster(2, cpus=2, gpus=1)
    run = [*TINY, "clients=4", "clients_per_round=4", "rounds=6", "train.local_steps=60"]
    out = tmp_path / "on-cluster"
    proc = launch(c, [*run, "simulation.num_gpus=0.5", f"output_dir={out}"])
    try:
        wait(lambda: len(table(out)) >= 2 or proc.poll() is not None, timeout=RUN_S, what="round 1", fed=c)
        probe = f"import ray; ray.init(address='{c.address}', logging_level='ERROR'); "
        probe += "print(ray.available_resources().get('GPU', 0))"
        free = float(c.call(HEAD, [sys.executable, "-c", probe]).stdout.split()[-1])
        c.kill("worker-1")  # the host dies: raylet, object store, its client actors, all at once
        output, _ = proc.communicate(timeout=RUN_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert finished(out, 6)
    assert free == 0, f"{free} of 2 GPUs free while the clients live"
    workers = [c.hosts["worker-0"].address, c.hosts["worker-1"].address]
    where = placements(out)
    assert sorted(where[1]) == workers, where[1]  # clients on both workers, none on the head (0 CPUs)
    first = [client for host in where[1].values() for client in host]
    assert len({pid for _, pid, _, _ in first}) == 4, first  # four actors at once, each holding half a GPU
    for host in workers:
        assert [gpus for _, _, gpus, _ in where[1][host]] == ["0", "0"], where[1]  # two clients per GPU
    assert {device for *_, device in first} == {"cpu"}
    assert sorted(where[6]) == workers[:1], where[6]  # after the kill: the surviving worker only
    assert "a Ray actor was lost" in server_log(out)
    for r in table(out)[1:]:
        assert (r["replies_expected"], r["replies_received"]) == ("4", "4"), r
    cfg, _ = compose([*run, f"output_dir={tmp_path / 'one-host'}"])
    assert_same_run(out, run_in_process(cfg))
