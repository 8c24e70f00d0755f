"""The fedlora command line. Hydra composes and validates the config; the CLI owns the console.

    fedlora simulate strategy=fedavg clients=100 rounds=3

Bad input prints one line (``error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedlora.compose import GROUPS, compose, group_options
from fedlora.config import ConfigError, RunConfig
from fedlora.report import human_bytes

EXIT_USAGE = 2

console = Console(stderr=False)
err_console = Console(stderr=True)
log = logging.getLogger("fedlora")


# -- help -----------------------------------------------------------------------------
def describe_config() -> str:
    """The groups, their options and every key with its default, for --help."""
    try:
        cfg, _ = compose([])
    except ConfigError as err:  # pragma: no cover - the shipped defaults are valid
        return f"(config does not compose: {err})"
    flat = cfg.to_flat()
    lines = ["config groups (pick one: group=option):"]
    lines += [f"  {g:<11} {', '.join(group_options(g))}" for g in GROUPS]
    lines.append("")
    lines.append("keys and defaults (override with key=value or group.key=value):")
    for key, value in flat.items():
        lines.append(f"  {key}={value if value != '' else 'null'}")
    lines.append("")
    lines.append("example: fedlora simulate strategy=fedavg model=tiny clients=100 clients_per_round=10 rounds=3")
    return "\n".join(lines)


def build_parser(*, describe: bool = False) -> argparse.ArgumentParser:
    """The argument parser; ``describe`` composes the config to list it in ``simulate --help``."""
    parser = argparse.ArgumentParser(
        prog="fedlora",
        description="Federated LoRA fine-tuning on Flower: simulate many clients, deploy the same apps.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    simulate = sub.add_parser(
        "simulate",
        help="run a federated fine-tuning simulation (Flower simulation engine, Ray)",
        description="Run a federated LoRA fine-tuning simulation. Arguments are Hydra overrides.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=describe_config() if describe else None,
    )
    simulate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides, e.g. clients=100")
    simulate.add_argument("--dry-run", action="store_true", help="validate, show the partitions, and stop")
    simulate.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    sweep = sub.add_parser(
        "sweep",
        help="run a grid of simulations (strategies x epsilon x seeds) and write its report",
        description="Run a sweep (conf/sweep/<name>.yaml); a finished cell is not run again. "
        "Arguments after the options are Hydra overrides for every cell.",
    )
    sweep.add_argument("name", choices=["privacy"], help="the sweep (its grid: conf/sweep/<name>.yaml)")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides for every cell")
    sweep.add_argument("--out", type=Path, default=None, help="the sweep folder (default: sweeps/<name>)")
    sweep.add_argument("--strategies", nargs="+", default=None, help="replace the grid's strategies")
    sweep.add_argument("--epsilons", nargs="+", default=None, help="replace the grid's epsilons (inf: no DP)")
    sweep.add_argument("--seeds", nargs="+", type=int, default=None, help="replace the grid's seeds")
    report = sub.add_parser("report", help="write report.html and report.md for a sweep folder")
    report.add_argument("folder", type=Path, help="a sweep folder (holding cells/)")
    add_deploy_parser(sub)
    for p in (sweep, report):
        p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    return parser


# -- deploy ------------------------------------------------------------------------------
def add_deploy_parser(sub: Any) -> None:
    deploy = sub.add_parser(
        "deploy",
        help="certificates, keys and the Flower commands of a real deployment (TLS and node auth on)",
        description="Run fedlora on real machines with Flower's SuperLink and SuperNodes. "
        "Each command prints the Flower command it runs; --print only prints it.",
    )
    steps = deploy.add_subparsers(dest="step", metavar="STEP", required=True)
    certs = steps.add_parser("certs", help="make a CA, the SuperLink's certificate and node key pairs")
    certs.add_argument("folder", type=Path)
    certs.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"], help="the SuperLink's names/IPs")
    certs.add_argument("--nodes", type=int, default=0, help="how many node key pairs (node-<i>, node-<i>.pub)")
    link = steps.add_parser("superlink", help="start flower-superlink with TLS and --enable-supernode-auth")
    link.add_argument("--certs", type=Path, required=True, help="the folder of `fedlora deploy certs`")
    link.add_argument("--host", default="0.0.0.0")
    link.add_argument("--port", type=int, default=8000)
    link.add_argument("--database", type=Path, default=None, help="keep the SuperLink's state in this file")
    connection = steps.add_parser("connection", help="save the SuperLink's address and CA for flwr ($FLWR_HOME)")
    connection.add_argument("--superlink", required=True, help="HOST:PORT")
    connection.add_argument("--ca", type=Path, required=True, help="the CA certificate (ca.crt)")
    connection.add_argument("--name", default="fedlora")
    register = steps.add_parser("register", help="put node public keys on the SuperLink's list")
    register.add_argument("public_keys", nargs="+", type=Path)
    register.add_argument("--connection", default="fedlora")
    node = steps.add_parser("supernode", help="start flower-supernode with its key and node config")
    node.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    node.add_argument("--ca", type=Path, required=True, help="the CA certificate (ca.crt)")
    node.add_argument("--key", type=Path, required=True, help="this node's private key (node-<i>)")
    node.add_argument("--partition-id", type=int, required=True, help="this client's id, 0..clients-1")
    node.add_argument("--num-partitions", type=int, default=None, help="parts of the data (1: all this node's)")
    node.add_argument("--data-path", default=None, help="this machine's data file or folder")
    node.add_argument("--port", type=int, default=9094, help="the node's local ClientApp API port")
    run = steps.add_parser("run", help="submit a run: Hydra overrides -> the App's run config -> flwr run")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    run.add_argument("--connection", default="fedlora")
    run.add_argument("--app", type=Path, default=Path("."), help="the App folder (this project)")
    run.add_argument("--stream", action="store_true", help="follow the run's logs")
    steps.add_parser("config", help="print [tool.flwr.app.config] (the App's run config defaults)")
    for p in (certs, link, connection, register, node, run):
        p.add_argument("--print", dest="print_only", action="store_true", help="print the command, do not run it")
    deploy.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)


def run_deploy_command(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    from fedlora import deploy
    from fedlora.appconfig import run_config_for, toml_section

    def execute(argv: list[str], *, replace: bool = False) -> int:
        """Run ``argv``; ``replace``: become it (a long-running server gets the signals, e.g. in a container)."""
        console.print(deploy.show(argv), highlight=False, soft_wrap=True)
        if args.print_only:
            return 0
        env = os.environ | {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        if replace:
            sys.stdout.flush()
            os.execvpe(argv[0], argv, env)
        return subprocess.run(argv, env=env, check=False).returncode

    step = args.step
    if step == "config":
        console.print(toml_section(), end="", highlight=False, markup=False)
        return 0
    if step == "certs":
        if not args.print_only:
            deploy.make_certificates(args.folder, hosts=args.hosts, nodes=args.nodes)
        console.print(f"certificates and keys in {args.folder} (existing files kept)")
        return 0
    if step == "superlink":
        for name in (deploy.CA_CERT, deploy.SERVER_CERT, deploy.SERVER_KEY):
            if not (args.certs / name).is_file():
                raise ConfigError(f"{args.certs / name} does not exist (make it with: fedlora deploy certs)")
        argv = deploy.superlink_command(args.certs, host=args.host, port=args.port, database=args.database)
        return execute(argv, replace=True)
    if step == "connection":
        if not args.ca.is_file():
            raise ConfigError(f"{args.ca} does not exist")
        if not args.print_only:
            console.print(f"wrote {deploy.write_connection(args.superlink, ca=args.ca, name=args.name)}")
        return 0
    if step == "register":
        missing = [str(k) for k in args.public_keys if not k.is_file()]
        if missing:
            raise ConfigError(f"no such public key file: {missing[0]}")
        codes = [execute(deploy.register_command(k, connection=args.connection)) for k in args.public_keys]
        return max(codes)
    if step == "supernode":
        for path in (args.ca, args.key):
            if not path.is_file():
                raise ConfigError(f"{path} does not exist")
        argv = deploy.supernode_command(
            superlink=args.superlink,
            ca=args.ca,
            key=args.key,
            partition_id=args.partition_id,
            num_partitions=args.num_partitions,
            data_path=args.data_path,
            port=args.port,
        )
        return execute(argv, replace=True)
    # run: compose and validate here, then hand Flower the keys that differ from the App's defaults
    cfg, _ = compose(list(args.overrides))
    with tempfile.TemporaryDirectory() as tmp:
        path = deploy.write_run_config(run_config_for(cfg), Path(tmp) / "run_config.toml")
        console.print(path.read_text(), end="", highlight=False, markup=False)
        return execute(deploy.run_command(path, app=args.app, connection=args.connection, stream=args.stream))


def run_sweep_command(args: argparse.Namespace) -> int:
    from fedlora.sweep import defaults, grid, parse_epsilon, run_sweep

    grid_defaults = defaults(args.name)
    cells = grid(
        args.strategies or list(grid_defaults["strategies"]),
        [parse_epsilon(e) for e in (args.epsilons or grid_defaults["epsilons"])],
        args.seeds or [int(s) for s in grid_defaults["seeds"]],
    )
    compose(list(args.overrides))  # bad overrides fail here, not in every cell
    out = (args.out or Path("sweeps") / args.name).resolve()
    page = run_sweep(cells, list(args.overrides), out)
    console.print(f"report: {page}")
    return 0


# -- simulate ----------------------------------------------------------------------------
def simulate(cfg: RunConfig, composed: Any, *, dry_run: bool, verbose: bool) -> int:
    import torch
    from omegaconf import OmegaConf

    from fedlora.checkpoint import METRICS, read_metrics, write_json
    from fedlora.worker import get_worker

    if cfg.simulation.num_gpus > 0 and not torch.cuda.is_available() and not cfg.simulation.ray_address:
        raise ConfigError("simulation.num_gpus > 0 but this machine has no CUDA GPU")
    out = Path(cfg.output_dir or Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")).resolve()
    cfg.output_dir = str(out)
    composed.output_dir = str(out)

    # Load data and model here, before Ray starts: bad paths and columns fail fast, and the
    # ServerApp (a thread of this process) finds them in the worker cache.
    worker = get_worker(cfg)
    splits = worker.splits
    show_partitions(worker, out if not dry_run else None)
    worker.model  # noqa: B018 - builds and caches the model, validating path and target modules
    if worker.strategy.gradient_init and cfg.strategy.init_source != "clients":
        worker.calibration  # noqa: B018 - loads the calibration file now, not after the nodes started
    if cfg.privacy.enabled:
        show_privacy(worker)  # calibrates every client's noise now: an impossible budget fails here
    resolved = OmegaConf.to_yaml(composed)
    if dry_run:
        console.print(resolved)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(resolved)
    write_json(out / "run_config.json", cfg.to_flat())
    trainable = sum(worker.params[k].numel() for k in worker.trainable_keys)
    adapter_ids = {id(p) for p in worker.params.values()}
    total = sum(p.numel() for p in worker.model.parameters() if id(p) not in adapter_ids)  # the base model
    ranks = sorted({worker.client_rank(pid) for pid in range(cfg.clients)})
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]} by client"
    console.print(
        f"[bold]fedlora[/] strategy={cfg.strategy.name} model={cfg.model.name} "
        f"({trainable:,} of {total:,} parameters trainable; LoRA r={rank}, s={cfg.scaling:g}) "
        f"data={cfg.data.name} "
        f"({len(splits.train)} train / {len(splits.test)} test, {splits.num_labels} labels) "
        f"clients={cfg.clients} per round={cfg.sampled_per_round} rounds={cfg.rounds} -> {out}"
    )
    run_flower_simulation(cfg, verbose=verbose)
    rows = read_metrics(out / METRICS)
    console.print(summary_table(rows))
    console.print(f"outputs: {out}  (metrics.csv, checkpoint.safetensors, adapter/)")
    return 0


def run_flower_simulation(cfg: RunConfig, *, verbose: bool) -> None:
    from flwr.simulation import run_simulation
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedlora.flower.client_app import make_client_app
    from fedlora.flower.server_app import make_server_app

    flat = cfg.to_flat()
    init_args: dict[str, Any] = {"logging_level": logging.INFO if verbose else logging.WARNING}
    init_args["log_to_driver"] = verbose
    if cfg.simulation.ray_address:
        init_args["address"] = cfg.simulation.ray_address
    backend = {
        "client_resources": {"num_cpus": cfg.simulation.num_cpus, "num_gpus": cfg.simulation.num_gpus},
        "init_args": init_args,
    }
    columns = (TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("rounds", total=cfg.rounds)

        def on_round(row: dict[str, Any]) -> None:
            progress.console.print(round_line(row, cfg.rounds))
            if row["round"] > 0:
                progress.advance(task)

        run_simulation(
            server_app=make_server_app(flat, on_round=on_round),
            client_app=make_client_app(flat),
            num_supernodes=cfg.clients,
            backend_config=backend,
            verbose_logging=verbose,
        )


def round_line(row: dict[str, Any], rounds: int) -> str:
    acc = row.get("test_accuracy")
    parts = [f"round {row['round']}/{rounds}"]
    parts.append(f"acc {acc:.4f} loss {row['test_loss']:.4f}" if acc is not None else "acc -")
    if row.get("train_loss") is not None:
        parts.append(f"train {row['train_loss']:.4f}")
    if row.get("replies_expected"):
        parts.append(f"{row['replies_received']}/{row['replies_expected']} replies")
        if row.get("refused"):
            parts.append(f"{row['refused']} refused (budget)")
        if row.get("epsilon_max") is not None:
            parts.append(f"eps max {row['epsilon_max']:.3g}")
        parts.append(f"up {human_bytes(row['bytes_up'])} down {human_bytes(row['bytes_down'])}")
    parts.append(f"{row['wall_s']:.1f} s")
    return " | ".join(parts)


def summary_table(rows: list[dict[str, str]]) -> Table:
    table = Table(title="fedlora: rounds")
    for name in ("round", "test acc", "test loss", "train loss", "replies", "up", "down", "wall s"):
        table.add_column(name, justify="right")
    for r in rows:
        replies = f"{r['replies_received']}/{r['replies_expected']}" if r["replies_expected"] else ""
        table.add_row(
            r["round"],
            _fmt(r["test_accuracy"], ".4f"),
            _fmt(r["test_loss"], ".4f"),
            _fmt(r["train_loss"], ".4f"),
            replies,
            human_bytes(float(r["bytes_up"])) if r["bytes_up"] else "",
            human_bytes(float(r["bytes_down"])) if r["bytes_down"] else "",
            _fmt(r["wall_s"], ".1f"),
        )
    return table


def _fmt(value: str, spec: str) -> str:
    return format(float(value), spec) if value not in ("", None) else ""


def show_privacy(worker: Any) -> None:
    """Every client's DP-SGD plan, summarised: noise, delta, scheduled rounds, planned spend."""
    from fedlora.privacy import UNSAFE_WARNING, epsilon

    cfg = worker.cfg
    if cfg.privacy.unsafe_seeded_randomness:
        err_console.print(f"[bold red]warning:[/] {UNSAFE_WARNING}", highlight=False, soft_wrap=True)
    plans = [worker.privacy_plan(pid) for pid in range(cfg.clients)]
    active = [p for p in plans if p.rounds or p.init_release]
    if not active:
        return
    sigmas = [p.noise_multiplier for p in active]
    planned = [epsilon(p.planned(), p.delta, p.accountant) for p in active]
    budget = f"epsilon <= {cfg.privacy.epsilon:g}" if cfg.privacy.epsilon is not None else "no budget"
    randomness = "NOT PRIVATE (seeded)" if cfg.privacy.unsafe_seeded_randomness else "private (OS entropy)"
    console.print(
        f"privacy=dp ({budget}, {cfg.privacy.accountant}, {cfg.privacy.grad_sample_mode}): noise multiplier "
        f"{min(sigmas):.3g}..{max(sigmas):.3g}, clip {cfg.privacy.max_grad_norm:g}, delta "
        f"{min(p.delta for p in active):.2g}..{max(p.delta for p in active):.2g}, "
        f"{min(p.rounds for p in active)}..{max(p.rounds for p in active)} rounds per client, "
        f"planned epsilon {min(planned):.3g}..{max(planned):.3g}; weighting {cfg.strategy.weighting}; "
        f"noise and sampling: {randomness}"
    )


def show_partitions(worker: Any, out: Path | None) -> None:
    """Per-client sizes and label counts: a summary on the console, every client in a CSV."""
    import numpy as np

    from fedlora.data import label_counts, label_skew

    labels = worker.splits.train["label"]
    counts = label_counts(labels, worker.partitions, worker.splits.num_labels)
    sizes = counts.sum(1)
    cfg = worker.cfg
    table = Table(title=f"partition={cfg.partition.name}: {cfg.clients} clients", title_justify="left")
    table.add_column("client", justify="right")
    table.add_column("examples", justify="right")
    names = worker.splits.label_names
    for name in names:
        table.add_column(name[:12], justify="right")
    shown = list(range(min(len(sizes), 8)))
    for i in shown:
        table.add_row(str(i), str(sizes[i]), *map(str, counts[i]))
    if len(sizes) > len(shown):
        table.add_row(f"... {len(sizes) - len(shown)} more", "", *[""] * len(names))
    console.print(table)
    console.print(
        f"examples per client: min {sizes.min()}  median {int(np.median(sizes))}  max {sizes.max()}  "
        f"total {sizes.sum()};  label skew (mean TV distance to the global mix) {label_skew(counts):.3f}"
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        header = "client,examples," + ",".join(names)
        rows = [f"{i},{sizes[i]}," + ",".join(map(str, counts[i])) for i in range(len(sizes))]
        (out / "partitions.csv").write_text("\n".join([header, *rows]) + "\n")


# -- entry point -------------------------------------------------------------------------
_EXPECTED_FLOWER_NOTICES = (
    "DEPRECATED FEATURE: The `run_simulation`",  # the simulation API this project is built on
    "fraction_evaluate is set to 0.0",  # by design: evaluation is central, on the server
)


def _quiet_flower(record: logging.LogRecord) -> bool:
    """Flower's warnings and errors, less the notices that every fedlora run triggers."""
    message = record.getMessage()
    return record.levelno >= logging.WARNING and not message.startswith(_EXPECTED_FLOWER_NOTICES)


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )
    # Flower logs through its own console handler; keep it from also reaching ours, and
    # (unless verbose) let only its warnings through: the CLI prints one line per round.
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    if not verbose:
        flwr_logger.addFilter(_quiet_flower)
    for noisy in ("datasets", "transformers", "ray", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("fedlora").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # Ray's notice about a future default; num_gpus=0 must keep hiding GPUs, as it does now.
        warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wants_help = bool(argv) and argv[0] == "simulate" and ("-h" in argv or "--help" in argv)
    parser = build_parser(describe=wants_help)
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "sweep" or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # a sweep's overrides may come after its options
        args.overrides = [*args.overrides, *extra]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging(args.verbose)
    started = time.perf_counter()
    try:
        if args.command == "sweep":
            return run_sweep_command(args)
        if args.command == "deploy":
            return run_deploy_command(args)
        if args.command == "report":
            from fedlora.report import write_report

            if not (args.folder / "cells").is_dir():
                raise ConfigError(f"{args.folder} is not a sweep folder (no cells/ in it)")
            console.print(f"report: {write_report(args.folder)}")
            return 0
        cfg, composed = compose(args.overrides)
        code = simulate(cfg, composed, dry_run=args.dry_run, verbose=args.verbose)
    except ConfigError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    log.debug("done in %.1f s", time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
