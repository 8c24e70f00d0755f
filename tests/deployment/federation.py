"""A real Flower federation on 127.0.0.1: one SuperLink (TLS, node auth) and SuperNodes, as processes.

Commands come from :mod:`fedlora.deploy.setup`, the same helpers ``fedlora deploy`` and the
docker images use. Every process gets its own log file and process group; ``stop``
kills by process id, and ``close`` stops them all.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.config.app import run_config_for
from fedlora.config.compose import compose
from fedlora.deploy import setup as deploy

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, *, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} did not open within {timeout:.0f} s")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 15.0) -> None:
        """Stop the process and its children (its own process group), by its process id."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=timeout)
            except ProcessLookupError:
                pass


@dataclass
class Federation:
    """Certificates, a SuperLink and its connection, SuperNodes, and runs submitted with ``flwr run``."""

    folder: Path
    processes: list[Process] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self.certs = self.folder / "certs"
        self.home = self.folder / "flwr-home"  # FLWR_HOME: this federation's connection, apps and state
        self.logs = self.folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        deploy.make_certificates(self.certs, nodes=0)
        self.env = os.environ | {
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",  # three nodes share two cores
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, name: str, argv: list[str], *, cwd: Path | None = None) -> Process:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=cwd or self.folder, start_new_session=True
            )
        proc = Process(name, popen, log)
        self.processes.append(proc)
        return proc

    def start_superlink(self) -> Process:
        self.port = free_port()
        argv = deploy.superlink_command(self.certs, host="127.0.0.1", port=self.port)
        proc = self.start("superlink", argv, cwd=self.folder)
        wait_for_port(self.port, timeout=60, proc=proc.popen)
        deploy.write_connection(self.address, ca=self.certs / deploy.CA_CERT, home=self.home)
        return proc

    def node_key(self, name: str, *, register: bool = True) -> Path:
        key = deploy.make_node_key(self.certs / name)
        if register:
            pub = key.with_name(key.name + ".pub")
            self.flwr(deploy.register_command(pub), timeout=60)
        return key

    def start_supernode(
        self, pid: int, num_partitions: int, *, key: Path | None = None, ca: bool = True, max_retries: int | None = None
    ) -> Process:
        key = key or self.node_key(f"node-{pid}")
        argv = deploy.supernode_command(
            superlink=self.address,
            ca=self.certs / deploy.CA_CERT if ca else None,
            key=key,
            partition_id=pid,
            num_partitions=num_partitions,
            port=free_port(),
            max_retries=max_retries,
        )
        return self.start(f"supernode-{pid}", argv)

    def flwr(self, argv: list[str], *, timeout: float) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, env=self.env, cwd=self.folder, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{deploy.show(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def submit(self, overrides: list[str], *, app: Path = ROOT, name: str = "run") -> Path:
        """``flwr run`` the App with a Hydra-style run; returns the run's output folder (not yet written)."""
        cfg, _ = compose(overrides)
        run_config = self.folder / f"{name}.toml"
        deploy.write_run_config(run_config_for(cfg), run_config)
        self.flwr(deploy.run_command(run_config, app=app), timeout=120)
        return Path(cfg.output_dir)

    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()

    def logs_text(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.text()[-4000:]}" for p in self.processes)


def wait_for(predicate, *, timeout: float, what: str, federation: Federation | None = None, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    logs = federation.logs_text() if federation is not None else ""
    raise TimeoutError(f"{what}: not within {timeout:.0f} s\n{logs}")


if __name__ == "__main__":  # a manual trial: python tests/deployment/federation.py /tmp/fed
    fed = Federation(Path(sys.argv[1]))
    try:
        fed.start_superlink()
        for i in range(3):
            fed.start_supernode(i, 3)
        run = ["model=tiny", "clients=3", "clients_per_round=3", "rounds=2"]
        out = fed.submit([*run, f"output_dir={sys.argv[1]}/out"])
        wait_for(lambda: (out / "adapter").exists(), timeout=600, what="run finished", federation=fed)
        print((out / "metrics.csv").read_text())
    finally:
        print(fed.logs_text())
        fed.close()
