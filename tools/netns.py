"""A federation of Linux network namespaces on one machine: every host its own address, as on real machines.

Loopback hides what a real deployment meets: distinct addresses, certificates that must
name the address a node dials, listeners on the wrong interface, links that go down.
This module builds, as root, a small network: a namespace holding a bridge (the
"switch"), one namespace for the SuperLink, one per SuperNode and one for the user who
submits runs, each joined to the switch by a veth pair and given one address in
``10.77.0.0/24``. That range exists only inside these namespaces; nothing listens or
dials outside them. The federation is then started with the commands of
docs/deployment.md (``fedlora deploy certs|superlink|connection|register|supernode|run``),
each inside its host's namespace, so those steps are checked wherever this runs.

Command line (``scripts/netns-federation.sh`` wraps it)::

    python -m tools.netns up DIR [--nodes 3]     # network, certificates, SuperLink, registered SuperNodes
    python -m tools.netns run DIR KEY=VALUE...   # fedlora deploy run ... --stream, from the user's namespace
    python -m tools.netns cut DIR node-1         # take a host's link down (restore: brings it back)
    python -m tools.netns down DIR               # stop every process, delete every namespace and link

``DIR`` keeps the state (``netns.json``), certificates, logs and each host's ``FLWR_HOME``.
Names carry a per-federation id, so several federations (or test runs) never meet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUBNET = "10.77.0"
PORT = 8000  # the SuperLink's one port (Fleet, Control and Runtime APIs), as in docs/deployment.md
LINK, USER, SWITCH = "superlink", "user", "switch"
ROOT = Path(__file__).resolve().parents[1]  # the App (pyproject.toml) that runs are submitted from


class Unavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no CAP_NET_ADMIN, no ``ip``)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def check_available() -> None:
    """Raise :class:`Unavailable` with the reason when this machine cannot build the network."""
    if shutil.which("ip") is None:
        raise Unavailable("no `ip` command (iproute2)")
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root (CAP_NET_ADMIN)")
    probe = f"flprobe{os.getpid()}"
    done = ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        raise Unavailable(f"`ip netns add` failed: {done.stderr.strip()}")
    ip("netns", "del", probe, check=False)


def fedlora_command() -> list[str]:
    """How to call fedlora's CLI (the console script where it is installed)."""
    found = shutil.which("fedlora")
    return [found] if found else [sys.executable, "-m", "fedlora.cli"]


@dataclass
class Host:
    name: str  # superlink, user, node-<i>
    address: str
    namespace: str
    port: str  # its veth end on the switch (what `cut` takes down)


@dataclass
class NetnsFederation:
    """The network and processes of one federation; ``folder`` holds its state."""

    folder: Path
    nodes: int = 3
    id: str = ""
    hosts: dict[str, Host] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    used: dict[str, set[str]] = field(default_factory=dict)  # `fedlora deploy` steps run -> their flags

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).resolve()
        self.id = self.id or f"fl{os.getpid() % 100000}{int(time.time() * 1000) % 100:02d}"

    # -- state -------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.folder / "netns.json"

    def save(self) -> None:
        state = {"nodes": self.nodes, "id": self.id, "hosts": {k: asdict(h) for k, h in self.hosts.items()},
                 "pids": self.pids}  # fmt: skip
        self.state_file.write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, folder: Path) -> NetnsFederation:
        state = json.loads((Path(folder) / "netns.json").read_text())
        hosts = {k: Host(**h) for k, h in state["hosts"].items()}
        return cls(Path(folder), nodes=state["nodes"], id=state["id"], hosts=hosts, pids=state["pids"])

    @property
    def certs(self) -> Path:
        return self.folder / "certs"

    @property
    def superlink(self) -> str:
        return f"{self.hosts[LINK].address}:{PORT}"

    def home(self, host: str) -> Path:
        return self.folder / "home" / host

    # -- the network ---------------------------------------------------------------------
    def build(self) -> None:
        """The switch and one namespace per host, each with its address and loopback up."""
        check_available()
        self.folder.mkdir(parents=True, exist_ok=True)
        switch = f"{self.id}-{SWITCH}"
        self.hosts[SWITCH] = Host(SWITCH, "", switch, "br0")
        self.save()  # from here on, `down` finds whatever was made
        ip("netns", "add", switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for i, (name, address) in enumerate(self.layout()):
            host = Host(name, address, f"{self.id}-{name}", f"v{i}{self.id}"[:15])
            self.hosts[name] = host
            self.save()
            ip("netns", "add", host.namespace)
            ip("-n", switch, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
            ip("-n", switch, "link", "set", host.port, "master", "br0", "up")
            ip("-n", host.namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", host.namespace, "link", "set", "eth0", "up")
            ip("-n", host.namespace, "link", "set", "lo", "up")

    def layout(self) -> list[tuple[str, str]]:
        """Every host's name and address: the SuperLink .1, the user .2, node-i .11+i."""
        names = [LINK, USER, *(f"node-{i}" for i in range(self.nodes))]
        return [(name, f"{SUBNET}.{1 + i if i < 2 else 9 + i}") for i, name in enumerate(names)]

    def cut(self, host: str) -> None:
        """Take ``host``'s link down: its packets are dropped, no connection is reset."""
        ip("-n", self.hosts[SWITCH].namespace, "link", "set", self.hosts[host].port, "down")

    def restore(self, host: str) -> None:
        ip("-n", self.hosts[SWITCH].namespace, "link", "set", self.hosts[host].port, "up")

    # -- processes -------------------------------------------------------------------------
    def env(self, host: str) -> dict[str, str]:
        root = str(ROOT)
        return os.environ | {
            "FLWR_HOME": str(self.home(host)),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }

    def argv(self, host: str, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host].namespace, *args]

    def call(self, host: str, args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``args`` in ``host``'s namespace to the end; fails with its output."""
        self.home(host).mkdir(parents=True, exist_ok=True)
        done = subprocess.run(self.argv(host, args), env=self.env(host), cwd=self.folder, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} in {host} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    def start(self, host: str, args: list[str], *, name: str | None = None) -> int:
        """Start ``args`` in ``host``'s namespace, in its own process group, logging to logs/<name>.log."""
        name = name or host
        self.home(host).mkdir(parents=True, exist_ok=True)
        (self.folder / "logs").mkdir(exist_ok=True)
        with self.log(name).open("ab") as out:
            popen = subprocess.Popen(self.argv(host, args), stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env(host), cwd=self.folder, start_new_session=True)  # fmt: skip
        self.pids[name] = popen.pid
        self.save()
        return popen.pid

    def log(self, name: str) -> Path:
        return self.folder / "logs" / f"{name}.log"

    def text(self, name: str) -> str:
        return self.log(name).read_text(errors="replace") if self.log(name).exists() else ""

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop a started process and its group (SIGKILL after 15 s)."""
        pid = self.pids.pop(name, None)
        self.save()
        if pid is None:
            return
        for s, wait in ((sig, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, s)
            except (ProcessLookupError, PermissionError):
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG) != (0, 0):
                        return
                except ChildProcessError:  # not our child (another `python -m tools.netns`): poll
                    if not Path(f"/proc/{pid}").exists():
                        return
                time.sleep(0.1)

    # -- the deployment, with docs/deployment.md's commands -------------------------------------
    def deploy(self, step: str, *args: str) -> list[str]:
        """``fedlora deploy STEP ARGS``; the step and its flags are recorded in ``used`` (docs check)."""
        self.used.setdefault(step, set()).update(a for a in args if a.startswith("--"))
        return [*fedlora_command(), "deploy", step, *args]

    def up(self, *, wait_s: float = 120) -> None:
        """Network, certificates for the SuperLink's address, SuperLink, connection, registered keys, SuperNodes."""
        self.build()
        link = self.hosts[LINK].address
        run = subprocess.run(self.deploy("certs", str(self.certs), "--hosts", link, "--nodes", str(self.nodes)),
                             capture_output=True, text=True, check=False)  # fmt: skip
        if run.returncode != 0:
            raise RuntimeError(run.stdout + run.stderr)
        self.start(LINK, self.deploy("superlink", "--certs", str(self.certs), "--host", link, "--port",
                                     str(PORT), "--database", str(self.folder / "superlink.db")))  # fmt: skip
        self.wait_for_port(USER, link, PORT, timeout=wait_s)
        self.call(USER, self.deploy("connection", "--superlink", self.superlink, "--ca",
                                    str(self.certs / "ca.crt")))  # fmt: skip
        keys = [str(self.certs / f"node-{i}.pub") for i in range(self.nodes)]
        self.call(USER, self.deploy("register", *keys))
        for i in range(self.nodes):
            self.start_node(i)

    def start_node(self, i: int, *, superlink: str | None = None, max_retries: int | None = None,
                   name: str | None = None) -> int:  # fmt: skip
        args = ["--superlink", superlink or self.superlink, "--ca", str(self.certs / "ca.crt")]
        args += ["--key", str(self.certs / f"node-{i}"), "--partition-id", str(i), "--num-partitions", str(self.nodes)]
        args += ["--port", str(9094 + i)]  # as on one host (docs/deployment.md); each node has its own address here
        args += ["--max-retries", str(max_retries)] if max_retries is not None else []
        return self.start(f"node-{i}", self.deploy("supernode", *args), name=name)

    def submit(self, overrides: list[str], *, stream: bool = False, timeout: float = 120) -> str:
        """``fedlora deploy run OVERRIDES`` from the user's namespace; its output."""
        args = [*overrides, "--app", str(ROOT), *(["--stream"] if stream else [])]
        done = self.call(USER, self.deploy("run", *args), timeout=timeout)
        return done.stdout + done.stderr

    def wait_for_port(self, host: str, address: str, port: int, *, timeout: float) -> None:
        """Until ``host`` can open a TCP connection to ``address:port``."""
        probe = [sys.executable, "-c", f"import socket; socket.create_connection(('{address}', {port}), timeout=2)"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if subprocess.run(self.argv(host, probe), capture_output=True, check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{address}:{port} not reachable from {host} within {timeout:.0f} s\n{self.text(LINK)}")

    def down(self) -> None:
        """Stop every process, then delete every namespace (its links go with it). Safe to call twice."""
        for name in list(self.pids):
            self.stop(name)
        for host in sorted(self.hosts.values(), key=lambda h: h.name == SWITCH):  # the switch last
            for pid in ip("netns", "pids", host.namespace, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):  # anything else started inside (a ClientApp)
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", host.namespace, check=False)
        self.hosts.clear()
        if self.folder.exists():
            self.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netns-federation", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    subcommand(sub, "up").add_argument("--nodes", type=int, default=3)
    subcommand(sub, "run").add_argument("overrides", nargs="*")
    for name in ("cut", "restore"):
        subcommand(sub, name).add_argument("host", help="superlink, user or node-<i>")
    subcommand(sub, "down")
    args = parser.parse_args(argv)
    return command_line("netns-federation", lambda: _command(args))


def _command(args: argparse.Namespace) -> int:
    if args.command == "up":
        fed = up_or_removed(NetnsFederation(args.folder, nodes=args.nodes))
        print(f"up: SuperLink {fed.superlink}, {fed.nodes} SuperNodes; state in {fed.folder}")
        return 0
    fed = NetnsFederation.load(args.folder)
    if args.command == "run":
        run_args = [*args.overrides, "--app", str(ROOT), "--stream"]
        return subprocess.run(fed.argv(USER, fed.deploy("run", *run_args)),
                              env=fed.env(USER), cwd=fed.folder, check=False).returncode  # fmt: skip
    if args.command in ("cut", "restore"):
        getattr(fed, args.command)(args.host)
        return 0
    fed.down()
    return 0


def subcommand(sub: Any, name: str) -> argparse.ArgumentParser:
    """A harness sub-command: its first argument is the harness's state folder."""
    parser = sub.add_parser(name)
    parser.add_argument("folder", type=Path)
    return parser


def up_or_removed(harness: NetnsFederation) -> NetnsFederation:
    """``harness`` brought up, or, when that fails, everything it made removed before the error goes on."""
    try:
        harness.up()
    except BaseException:
        harness.down()
        raise
    return harness


def command_line(prog: str, command: Callable[[], int]) -> int:
    """A harness command's exit status; a missing namespace tool, state file or host is one line and 2."""
    try:
        return command()
    except (Unavailable, FileNotFoundError, KeyError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
