"""``fedlora deploy ...``: the sub-commands of a real deployment, each printing the Flower command it runs.

Parsing and one small handler per step; the certificates and command lines are
:mod:`fedlora.deploy.setup`'s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedlora.config.run import ConfigError
from fedlora.deploy import setup as deploy
from fedlora.outputs.console import console


def add_parser(sub: Any) -> None:
    """The ``deploy`` sub-command and its steps."""
    parser = sub.add_parser(
        "deploy",
        help="certificates, keys and the Flower commands of a real deployment (TLS and node auth on)",
        description="Run fedlora on real machines with Flower's SuperLink and SuperNodes. "
        "Each command prints the Flower command it runs; --print only prints it.",
    )
    steps = parser.add_subparsers(dest="step", metavar="STEP", required=True)
    certs = steps.add_parser("certs", help="make a CA, the SuperLink's certificate and node key pairs")
    certs.add_argument("folder", type=Path)
    certs.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"], help="the SuperLink's names/IPs")
    certs.add_argument("--nodes", type=int, default=0, help="how many node key pairs (node-<i>, node-<i>.pub)")
    certs.set_defaults(handler=certificates)
    link = steps.add_parser("superlink", help="start flower-superlink with TLS and --enable-supernode-auth")
    link.add_argument("--certs", type=Path, required=True, help="the folder of `fedlora deploy certs`")
    link.add_argument(
        "--host", default="127.0.0.1",
        help="the address to listen on (default: this machine only); nodes on other hosts need one they reach, "
        "e.g. this machine's address or 0.0.0.0: the Control API is then reachable there too",
    )  # fmt: skip
    link.add_argument("--port", type=int, default=8000, help="the one port of the Fleet, Control and Runtime APIs "
                      "(default: 8000)")  # fmt: skip
    link.add_argument("--database", type=Path, default=None, help="keep the SuperLink's state in this file")
    link.set_defaults(handler=superlink)
    connection = steps.add_parser("connection", help="save the SuperLink's address and CA for flwr ($FLWR_HOME)")
    connection.add_argument("--superlink", required=True, help="HOST:PORT")
    connection.add_argument("--ca", type=Path, required=True, help="the CA certificate (ca.crt)")
    connection.add_argument("--name", default="fedlora")
    connection.set_defaults(handler=connect)
    register = steps.add_parser("register", help="put node public keys on the SuperLink's list")
    register.add_argument("public_keys", nargs="+", type=Path)
    register.add_argument("--connection", default="fedlora")
    register.set_defaults(handler=register_nodes)
    node = steps.add_parser("supernode", help="start flower-supernode with its key and node config")
    node.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    node.add_argument("--ca", type=Path, required=True, help="the CA certificate (ca.crt)")
    node.add_argument("--key", type=Path, required=True, help="this node's private key (node-<i>)")
    node.add_argument("--partition-id", type=int, required=True, help="this client's id, 0..clients-1")
    node.add_argument("--num-partitions", type=int, default=None, help="parts of the data (1: all this node's)")
    node.add_argument("--data-path", default=None, help="this machine's data file or folder")
    node.add_argument("--port", type=int, default=9094, help="the node's local ClientApp API port (default: 9094; "
                      "several nodes on one host need distinct ports)")  # fmt: skip
    node.add_argument("--max-retries", type=int, default=None, help="give up after this many failed connections")
    node.set_defaults(handler=supernode)
    run = steps.add_parser("run", help="submit a run: Hydra overrides -> the App's run config -> flwr run")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    run.add_argument("--connection", default="fedlora")
    run.add_argument("--app", type=Path, default=Path("."), help="the App folder (this project)")
    run.add_argument("--stream", action="store_true", help="follow the run's logs")
    run.set_defaults(handler=submit)
    steps.add_parser("config", help="print [tool.flwr.app.config] (the App's run config defaults)").set_defaults(
        handler=print_config
    )
    for p in (certs, link, connection, register, node, run):
        p.add_argument("--print", dest="print_only", action="store_true", help="print the command, do not run it")
    parser.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)


def execute(args: argparse.Namespace, argv: list[str], *, replace: bool = False) -> int:
    """Print ``argv`` and run it; ``replace``: become it (a long-running server gets the signals)."""
    console.print(deploy.show(argv), highlight=False, soft_wrap=True)
    if args.print_only:
        return 0
    env = os.environ | {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    if replace:
        sys.stdout.flush()
        os.execvpe(argv[0], argv, env)
    return subprocess.run(argv, env=env, check=False).returncode


def require_files(*paths: Path, hint: str = "") -> None:
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"{path} does not exist{hint}")


def print_config(args: argparse.Namespace) -> int:
    from fedlora.config.app import toml_section

    console.print(toml_section(), end="", highlight=False, markup=False)
    return 0


def certificates(args: argparse.Namespace) -> int:
    files = deploy.certificate_files(args.folder, nodes=args.nodes)
    deploy.check_server_hosts(args.folder, args.hosts)
    for kept in (args.folder / deploy.CA_KEY, args.folder / deploy.SERVER_KEY):
        deploy.check_private(kept)  # kept keys are used again: refused, as ssh does, when others can read them
    if not args.print_only:
        deploy.make_certificates(args.folder, hosts=args.hosts, nodes=args.nodes)
    verb = "would write" if args.print_only else "wrote"
    new = [str(p) for p, existed in files.items() if not existed]
    kept = [str(p) for p, existed in files.items() if existed]
    if new:
        console.print(f"{verb}: {' '.join(new)}" + (f" (SuperLink certificate for {args.hosts})" if any(
            p.endswith(deploy.SERVER_CERT) for p in new) else ""), highlight=False)  # fmt: skip
    if kept:
        console.print(f"kept (never overwritten): {' '.join(kept)}", highlight=False)
    return 0


def superlink(args: argparse.Namespace) -> int:
    names = (deploy.CA_CERT, deploy.SERVER_CERT, deploy.SERVER_KEY)
    require_files(*(args.certs / name for name in names), hint=" (make it with: fedlora deploy certs)")
    deploy.check_private(args.certs / deploy.SERVER_KEY)
    argv = deploy.superlink_command(args.certs, host=args.host, port=args.port, database=args.database)
    if not ipaddress_is_loopback(args.host):
        console.print(
            f"[yellow]note:[/] {args.host}:{args.port} also serves Flower's Control API, which in Flower 1.41 "
            "(without its enterprise OIDC plugin) lets whoever reaches the port and trusts the CA submit runs: "
            "open the port only to the node hosts and yourself (firewall, private network or SSH tunnel)",
            highlight=False,
        )
    return execute(args, argv, replace=True)


def ipaddress_is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(args: argparse.Namespace) -> int:
    import tomli_w

    require_files(args.ca)
    if args.print_only:
        config = deploy.connection_config(args.superlink, ca=args.ca, name=args.name)
        console.print(f"# would write {deploy.flwr_config_path()}:", highlight=False)
        console.print(tomli_w.dumps(config), end="", highlight=False, markup=False)
        return 0
    console.print(f"wrote {deploy.write_connection(args.superlink, ca=args.ca, name=args.name)}")
    return 0


def register_nodes(args: argparse.Namespace) -> int:
    missing = [str(k) for k in args.public_keys if not k.is_file()]
    if missing:
        raise ConfigError(f"no such public key file: {missing[0]}")
    return max(execute(args, deploy.register_command(k, connection=args.connection)) for k in args.public_keys)


def supernode(args: argparse.Namespace) -> int:
    require_files(args.ca, args.key)
    deploy.check_private(args.key)
    argv = deploy.supernode_command(
        superlink=args.superlink,
        ca=args.ca,
        key=args.key,
        partition_id=args.partition_id,
        num_partitions=args.num_partitions,
        data_path=args.data_path,
        port=args.port,
        max_retries=args.max_retries,
    )
    return execute(args, argv, replace=True)


def submit(args: argparse.Namespace) -> int:
    """Compose and validate here, then hand Flower the keys that differ from the App's defaults, inline."""
    from fedlora.config.app import run_config_for
    from fedlora.config.compose import compose

    cfg, _ = compose(list(args.overrides))
    argv = deploy.run_command(
        deploy.run_config_arg(run_config_for(cfg)), app=args.app, connection=args.connection, stream=args.stream
    )
    return execute(args, argv)
