"""A Ray cluster of several hosts on one machine: a head and workers, each in its own network namespace.

The same network as :mod:`tools.netns` (a switch, one namespace and address per host,
``10.77.0.0/24`` existing only inside them), with docs/deployment.md's Ray-cluster
recipe run in it: ``ray start --head`` on the head (10.77.0.1, no CPUs of its
own, so that every client runs on a worker), ``ray start --address=10.77.0.1:6379`` on
each worker (10.77.0.11, .12, ...), and ``fedlora simulate ...
simulation.ray_address=10.77.0.1:6379`` from the head's namespace. A worker "dies" as a
host does: every process in its namespace is killed at once.

The cluster keeps its Ray files under its own temporary folder (short: Ray's socket
paths must fit 107 bytes), so that no other Ray on this machine finds it, and
``down`` kills every process in its namespaces (never ``ray stop``, which stops every
Ray on the machine).

Command line::

    python -m tools.ray_cluster up DIR [--workers 2]   # network, head, workers; prints the address
    python -m tools.ray_cluster simulate DIR KEY=VALUE...   # fedlora simulate on the cluster, from the head
    python -m tools.ray_cluster kill DIR worker-1      # the host dies
    python -m tools.ray_cluster down DIR
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.netns import SUBNET, NetnsFederation, command_line, fedlora_command, ip, subcommand, up_or_removed

HEAD = "head"
RAY_PORT = 6379
OBJECT_STORE_BYTES = 200 * 2**20  # tiny models: the default (30% of memory per node) only reserves /dev/shm


def ray_command() -> list[str]:
    found = shutil.which("ray")
    return [found] if found else [sys.executable, "-m", "ray.scripts.scripts"]


@dataclass
class RayCluster(NetnsFederation):
    """A head and ``nodes`` workers of ``worker_cpus`` CPUs each (and ``worker_gpus`` declared GPUs)."""

    worker_cpus: int = 1
    worker_gpus: float = 0

    def layout(self) -> list[tuple[str, str]]:
        return [(HEAD, f"{SUBNET}.1"), *((f"worker-{i}", f"{SUBNET}.{11 + i}") for i in range(self.nodes))]

    @property
    def address(self) -> str:
        return f"{self.hosts[HEAD].address}:{RAY_PORT}"

    @property
    def temp_dir(self) -> Path:
        return Path(tempfile.gettempdir()) / f"{self.id}-ray"

    def env(self, host: str) -> dict[str, str]:
        return super().env(host) | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_IMPORT_WARNING": "1"}

    def up(self, *, wait_s: float = 120) -> None:
        self.build()
        head = self.hosts[HEAD].address
        common = ["--block", "--disable-usage-stats", f"--object-store-memory={OBJECT_STORE_BYTES}"]
        self.start(HEAD, [*ray_command(), "start", "--head", f"--node-ip-address={head}", f"--port={RAY_PORT}",
                          "--num-cpus=0", "--include-dashboard=false", f"--temp-dir={self.temp_dir}",
                          *common])  # fmt: skip
        self.wait_for_port(HEAD, head, RAY_PORT, timeout=wait_s)
        for i in range(self.nodes):  # one at a time: on a loaded machine a raylet may miss Ray's 30 s to register
            name = f"worker-{i}"
            argv = [*ray_command(), "start", f"--address={self.address}",
                    f"--node-ip-address={self.hosts[name].address}", f"--num-cpus={self.worker_cpus}",
                    f"--num-gpus={self.worker_gpus}", *common]  # fmt: skip
            self.start_ray_node(name, argv, timeout=wait_s)
        self.wait_for_nodes(1 + self.nodes, timeout=wait_s)

    def start_ray_node(self, name: str, argv: list[str], *, timeout: float, attempts: int = 3) -> None:
        """``ray start --block ...`` in ``name``'s namespace until its log says it started; a start that fails
        (Ray gives a raylet 30 s to register, which a loaded machine can miss) is cleaned up and tried again."""
        for _ in range(attempts):
            offset = len(self.text(name))
            pid = self.start(name, argv)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if "Ray runtime started" in self.text(name)[offset:]:
                    return
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    break  # it exited: the start failed
                time.sleep(0.5)
            self.kill(name)
        raise TimeoutError(f"{name}: Ray did not start in {attempts} attempts\n{self.text(name)[-3000:]}")

    def alive_nodes(self) -> int:
        """How many Ray nodes the head counts alive."""
        probe = "import ray; ray.init(address='%s', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
        done = self.call(HEAD, [sys.executable, "-c", probe % self.address], timeout=120)
        return int(done.stdout.strip().splitlines()[-1])

    def wait_for_nodes(self, n: int, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (alive := self.alive_nodes()) != n:
            if time.monotonic() > deadline:
                logs = "\n".join(f"== {k}\n{self.text(k)[-2000:]}" for k in self.pids)
                raise TimeoutError(f"{alive} of {n} Ray nodes alive after {timeout:.0f} s\n{logs}")
            time.sleep(1)

    def simulate_argv(self, overrides: list[str]) -> list[str]:
        """``fedlora simulate OVERRIDES`` on this cluster, from the head's namespace."""
        return self.argv(HEAD, [*fedlora_command(), "simulate", *overrides, f"simulation.ray_address={self.address}"])

    def kill(self, host: str) -> None:
        """``host`` dies: every process in its namespace is killed at once (no Ray shutdown)."""
        for pid in ip("netns", "pids", self.hosts[host].namespace, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        self.pids.pop(host, None)
        self.save()

    def down(self) -> None:
        super().down()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ray-cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = subcommand(sub, "up")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--cpus", type=int, default=1, help="CPUs per worker")
    up.add_argument("--gpus", type=float, default=0, help="GPUs declared per worker")
    subcommand(sub, "simulate").add_argument("overrides", nargs="*")
    subcommand(sub, "kill").add_argument("host", help="worker-<i>")
    subcommand(sub, "down")
    args = parser.parse_args(argv)
    return command_line("ray-cluster", lambda: _command(args))


def _command(args: argparse.Namespace) -> int:
    import subprocess

    if args.command == "up":
        cluster = RayCluster(args.folder, nodes=args.workers, worker_cpus=args.cpus, worker_gpus=args.gpus)
        up_or_removed(cluster)
        print(f"up: Ray head {cluster.address}, {cluster.nodes} workers; state in {cluster.folder}")
        return 0
    cluster = RayCluster.load(args.folder)
    if args.command == "simulate":
        return subprocess.run(cluster.simulate_argv(args.overrides), env=cluster.env(HEAD), check=False).returncode
    if args.command == "kill":
        cluster.kill(args.host)
        return 0
    cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
