"""Deployment helpers: the Flower commands that start a federation, in one namespace with the certificates.

Flower runs a deployment with three programs: ``flower-superlink`` (one, reachable by
every node), ``flower-supernode`` (one per client machine) and ``flwr`` (the user's
CLI, which submits runs). These helpers build their command lines with TLS and
SuperNode authentication always on; ``fedlora deploy ...`` prints and runs them, the
docker images run them, and the deployment tests start them. Nothing here
replaces Flower: it only fills in the flags.

Certificates and keys: :mod:`fedlora.deploy.certificates` (re-exported here, so that ``deploy.<step>``
names every step of a deployment).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from fedlora.config.groups import ConfigError
from fedlora.deploy.certificates import (  # noqa: F401 - re-exported: one namespace for the steps
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    certificate_files,
    check_private,
    check_server_hosts,
    make_certificates,
    make_node_key,
    server_hosts,
)

CONNECTION = "fedlora"  # the SuperLink connection's name in $FLWR_HOME/config.toml
SUPERLINK_PORT = 8000
SUPERNODE_PORT = 9094


def superlink_command(
    certs: Path, *, host: str = "127.0.0.1", port: int = SUPERLINK_PORT, database: Path | None = None
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication; one port serves all its APIs.

    Runtime dependency installation is off: the SuperLink must never ``uv sync`` the
    app (that would pull CUDA torch); fedlora is installed on the machine instead.
    """
    argv = [
        "flower-superlink",
        "--ssl-ca-certfile", str(certs / CA_CERT),
        "--ssl-certfile", str(certs / SERVER_CERT),
        "--ssl-keyfile", str(certs / SERVER_KEY),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip
    if database is not None:
        argv += ["--database", str(database)]
    return argv


def supernode_command(
    *,
    superlink: str,
    ca: Path | None,
    key: Path,
    partition_id: int,
    num_partitions: int | None = None,
    data_path: str | None = None,
    port: int = SUPERNODE_PORT,
    max_retries: int | None = None,
) -> list[str]:
    """``flower-supernode`` verifying the SuperLink with ``ca`` and signing in with ``key``.

    Node config: ``partition-id`` (this client's id, 0..clients-1), ``num-partitions``
    (how many parts the data is split into; 1: ``data-path`` is all this node's) and
    ``data-path`` (this machine's data; default: the run's ``data.path``).
    ``max_retries``: give up after that many failed connection attempts (None: never).
    """
    node_config = [f"partition-id={partition_id}"]
    if num_partitions is not None:
        node_config.append(f"num-partitions={num_partitions}")
    if data_path:
        node_config.append(f"data-path={node_config_string(data_path)}")
    argv = ["flower-supernode", "--superlink", superlink]
    argv += ["--root-certificates", str(ca)] if ca is not None else []
    argv += ["--auth-supernode-private-key", str(key)]
    argv += ["--node-config", " ".join(node_config), "--port", str(port)]
    return argv + (["--max-retries", str(max_retries)] if max_retries is not None else [])


def node_config_string(value: str) -> str:
    """``value`` as a TOML string that Flower's ``--node-config`` parser reads back exactly.

    Flower matches ``'...'`` or ``"..."`` without escapes, then reads TOML: a plain value
    goes in ``"..."``; one with ``"`` or ``\\`` in a literal ``'...'`` (backslashes kept as
    they are); one with ``'`` and ``\\`` in ``"..."`` with TOML escapes. A value holding
    both quotes, or control characters, cannot be carried.
    """
    if any(ord(c) < 32 for c in value) or ("'" in value and '"' in value):
        raise ConfigError(
            f"--data-path {value!r}: Flower's node config cannot carry quotes of both kinds or control characters"
        )
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\") + '"'


def register_command(public_key: Path, *, connection: str = CONNECTION) -> list[str]:
    """``flwr supernode register``: put a node's public key on the SuperLink's list."""
    return ["flwr", "supernode", "register", str(public_key), connection]


def run_command(run_config: Path | str, *, app: Path = Path("."), connection: str = CONNECTION, stream: bool = False):
    """``flwr run``: submit the App with a run config, a TOML file or ``key=value`` pairs (``config.app``)."""
    return ["flwr", "run", str(app), connection, "--run-config", str(run_config), *(["--stream"] if stream else [])]


def flwr_config_path(home: Path | None = None) -> Path:
    """``$FLWR_HOME/config.toml`` (default ~/.flwr/config.toml): where flwr keeps its SuperLink connections."""
    return (home or Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")) / "config.toml"


def connection_config(superlink: str, *, ca: Path, name: str = CONNECTION, home: Path | None = None) -> dict:
    """flwr's config with the SuperLink connection ``name`` added or replaced (what :func:`write_connection` writes)."""
    import tomli

    path = flwr_config_path(home)
    config = tomli.loads(path.read_text()) if path.exists() else {}
    superlink_config = config.setdefault("superlink", {})
    superlink_config.setdefault("default", name)
    superlink_config[name] = {"address": superlink, "root-certificates": str(ca.resolve())}
    return config


def write_connection(superlink: str, *, ca: Path, name: str = CONNECTION, home: Path | None = None) -> Path:
    """Add (or replace) the SuperLink connection ``name`` in ``$FLWR_HOME/config.toml`` (default ~/.flwr)."""
    import tomli_w

    config = connection_config(superlink, ca=ca, name=name, home=home)
    path = flwr_config_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def run_config_arg(flat: dict) -> str:
    """A ``--run-config`` value holding ``flat``: space-separated ``key=value`` pairs, values in TOML."""
    import tomli_w

    return " ".join(f"{k}={tomli_w.dumps({'v': flat[k]})[4:].strip()}" for k in sorted(flat))


def write_run_config(flat: dict, path: Path) -> Path:
    """A ``--run-config`` TOML file (a file, not key=value pairs: values may hold spaces)."""
    import tomli_w

    path.write_text(tomli_w.dumps({k: flat[k] for k in sorted(flat)}))
    return path


def show(argv: Sequence[str]) -> str:
    return shlex.join(argv)
