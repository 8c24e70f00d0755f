"""The fedlora command line: it parses and dispatches; Hydra composes and validates the config.

    fedlora simulate strategy=fedavg clients=100 rounds=3

Bad input prints one line (``error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from fedlora.commands import bench
from fedlora.commands import deploy as deploy_cli
from fedlora.config.compose import GROUPS, HYDRA_KEYS, compose, group_options
from fedlora.config.run import ConfigError, RunFailed
from fedlora.outputs.console import console, err_console, setup_logging
from fedlora.outputs.run_folder import EXPORT_META

EXIT_USAGE = 2

log = logging.getLogger("fedlora")


def describe_config(overrides: list[str]) -> str:
    """The groups, their options, every key of the config ``overrides`` compose to, and each strategy's keys."""
    try:
        cfg, _ = compose(overrides)
    except ConfigError as err:
        return f"(the config does not compose: {err})"
    lines = ["config groups (pick one: group=option):"]
    lines += [f"  {g:<11} {', '.join(group_options(g))}" for g in GROUPS]
    lines += ["", "keys and defaults (override with key=value or group.key=value):"]
    lines += [f"  {key}={value if value != '' else 'null'}" for key, value in cfg.to_flat().items()]
    lines += ["", "each strategy's own keys (strategy=<name> strategy.<key>=...):"]
    for name in group_options("strategy"):
        own = {k: v for k, v in compose([f"strategy={name}"])[0].to_flat().items() if k.startswith("strategy.")}
        keys = [f"{k.removeprefix('strategy.')}={v if v != '' else 'null'}" for k, v in own.items()]
        own_keys = " ".join(k for k in keys if not k.startswith(("name=", "weighting=")))
        lines.append(f"  {name:<10} {own_keys or '(weighting only)'}")
    lines += ["", "example: fedlora simulate strategy=fedavg model=tiny clients=100 clients_per_round=10 rounds=3"]
    return "\n".join(lines)


def build_parser(*, describe: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``describe`` (overrides) composes the config to list it in ``simulate --help``."""
    parser = argparse.ArgumentParser(
        prog="fedlora",
        description="Federated LoRA fine-tuning on Flower: simulate many clients, deploy the same apps.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    simulate = sub.add_parser(
        "simulate",
        help="run a federated fine-tuning simulation (Flower simulation engine, Ray)",
        description="Run a federated LoRA fine-tuning simulation. Arguments are Hydra overrides; "
        "`fedlora simulate strategy=fed_sb --help` lists that strategy's keys with the rest.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=describe_config(describe) if describe is not None else None,
    )
    simulate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides, e.g. clients=100")
    simulate.add_argument("--dry-run", action="store_true", help="validate, show the partitions, and stop")
    simulate.add_argument(
        "-m", "--multirun", action="store_true", help="one run per combination of swept values (a,b; range(...))"
    )
    simulate.add_argument("--cfg", choices=["job"], default=None, help="print the composed job config and stop")
    simulate.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    simulate.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    simulate.set_defaults(handler=run_simulate)
    central = sub.add_parser(
        "centralised",
        help="the centralised reference: plain LoRA on the pooled data, as many optimizer steps as the federated run",
        description="Train the federated run's model and adapter on all its training data in one process, for as "
        "many optimizer steps (clients per round x local steps, per round) and the same evaluations. Arguments are "
        "the federated run's Hydra overrides (strategy and privacy are replaced by plain LoRA without DP).",
    )
    central.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the federated run's overrides")
    central.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    central.set_defaults(handler=run_centralised)
    bench.add_parsers(sub)
    predict = sub.add_parser("predict", help="label texts with an exported model (adapter/ of a run)")
    predict.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label")
    predict.add_argument("--adapter", type=Path, required=True, help="an export: a run's adapter/ folder")
    predict.add_argument("--file", type=Path, default=None, help="also label every line of this file")
    predict.set_defaults(handler=run_predict)
    gen = sub.add_parser("generate", help="complete prompts with an exported causal LM (task=causal_lm)")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT")
    gen.add_argument("--adapter", type=Path, required=True, help="an export: a run's adapter/ folder")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--merge", type=Path, default=None, help="also write the merged model (a transformers folder)")
    gen.set_defaults(handler=run_generate)
    report = sub.add_parser("report", help="write report.html and report.md for a sweep folder")
    report.add_argument("folder", type=Path, help="a sweep folder (holding cells/)")
    report.set_defaults(handler=run_report)
    deploy_cli.add_parser(sub)
    for p in (central, predict, gen, report):
        p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    return parser


def run_simulate(args: argparse.Namespace) -> int:
    from fedlora.commands.simulate import simulate

    overrides = list(args.overrides)
    hydra = {k: v for k, _, v in (o.partition("=") for o in overrides) if k in HYDRA_KEYS}
    if args.multirun:
        from fedlora.commands.multirun import multirun

        return multirun(overrides, sweep_dir=hydra.get("hydra.sweep.dir"), verbose=args.verbose)
    if "hydra.run.dir" in hydra:  # Hydra's name for the run's folder
        if any(o.startswith("output_dir=") for o in overrides):
            raise ConfigError("give output_dir or hydra.run.dir, not both")
        overrides.append(f"output_dir={hydra['hydra.run.dir']}")
    cfg, composed = compose(overrides)
    if args.cfg == "job":
        from omegaconf import OmegaConf

        console.print(OmegaConf.to_yaml(composed), end="", highlight=False, markup=False)
        return 0
    return simulate(
        cfg, composed, overrides=overrides, dry_run=args.dry_run, verbose=args.verbose, overwrite=args.overwrite
    )


def run_centralised(args: argparse.Namespace) -> int:
    from fedlora.commands.centralised import overrides_for
    from fedlora.commands.simulate import centralised

    overrides = overrides_for(list(args.overrides))
    cfg, composed = compose(overrides)
    return centralised(cfg, composed, overrides=overrides, overwrite=args.overwrite)


def run_predict(args: argparse.Namespace) -> int:
    from fedlora.commands.predict import predict

    texts = list(args.texts)
    if args.file is not None:
        if not args.file.is_file():
            raise ConfigError(f"{args.file} does not exist")
        texts += [line for line in args.file.read_text().splitlines() if line.strip()]
    if not texts:
        raise ConfigError("give texts to label, or --file")
    for text, label in zip(texts, predict(args.adapter, texts), strict=True):
        print(f"{label}\t{text}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from fedlora.commands.predict import generate, merge

    if not (args.adapter / EXPORT_META).is_file():
        raise ConfigError(f"{args.adapter} is not a fedlora export (no fedlora.json in it)")
    completions = generate(args.adapter, args.prompts, max_new_tokens=args.max_new_tokens)
    for prompt, completion in zip(args.prompts, completions, strict=True):
        print(f"> {prompt}\n{completion}\n")
    if args.merge is not None:
        console.print(f"merged model: {merge(args.adapter, args.merge)}")
    if not args.prompts and args.merge is None:
        raise ConfigError("give prompts to complete, or --merge")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from fedlora.commands.report import write_report

    if not (args.folder / "cells").is_dir():
        raise ConfigError(f"{args.folder} is not a sweep folder (no cells/ in it)")
    console.print(f"report: {write_report(args.folder)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wants_help = bool(argv) and argv[0] == "simulate" and ("-h" in argv or "--help" in argv)
    parser = build_parser(describe=[a for a in argv[1:] if "=" in a and not a.startswith("-")] if wants_help else None)
    args, extra = parser.parse_known_args(argv)
    takes_overrides = args.command in ("sweep", "bench", "simulate", "centralised")
    if extra and (not takes_overrides or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # overrides may come after the options too (argparse stops its positionals at an option)
        args.overrides = [*args.overrides, *extra]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging(args.verbose)
    started = time.perf_counter()
    try:
        code = args.handler(args)
    except ConfigError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except RunFailed as err:
        err_console.print(f"[bold red]failed:[/] {err}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        from fedlora.commands.simulate import RESUME_HINT

        err_console.print(f"interrupted; {RESUME_HINT}" if args.command == "simulate" else "interrupted")
        return 130
    log.debug("done in %.1f s", time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
