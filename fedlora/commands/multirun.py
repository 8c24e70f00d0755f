"""``fedlora simulate -m``: Hydra's multirun, one simulation per combination of the swept values.

    fedlora simulate -m strategy=fedavg,fedsvd train.lr=1e-3,5e-3 rounds=5

The overrides are parsed by Hydra's own override parser (``a,b``, ``range(1,4)``,
``choice(...)``...), and the jobs are the product of the swept values in order (the
last override varies fastest), as Hydra's basic sweeper lays them out. They run one
after the other in this process, each in ``<sweep dir>/<job number>``
(``hydra.sweep.dir``, default ``multirun/<date>/<time>``), with ``.hydra/`` like any
run; every job is composed and validated before the first starts. The sweep folder
gets ``multirun.yaml`` (the jobs' overrides) and ``summary.md`` (a row per job). Seeds are an axis
like any other (``seed=0,1,2``): when they are swept, the summary adds a row per setting over its seeds,
the final accuracy as mean ± the half-width of its 95% t interval, and n.
"""

from __future__ import annotations

import itertools
import time
from datetime import datetime
from pathlib import Path

import yaml

from fedlora.config.compose import compose
from fedlora.config.run import ConfigError
from fedlora.outputs.console import console
from fedlora.outputs.metrics import read_metrics
from fedlora.outputs.run_folder import METRICS
from fedlora.outputs.stats import t_interval


def jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of every job: the product of the swept values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
        for o in parsed
    ]
    return [list(combination) for combination in itertools.product(*choices)]


def multirun(overrides: list[str], *, sweep_dir: str | None, verbose: bool) -> int:
    """Run every job; write multirun.yaml and summary.md in the sweep folder."""
    from fedlora.commands.simulate import simulate

    if any(o.split("=", 1)[0] in ("output_dir", "hydra.run.dir") for o in overrides):
        raise ConfigError("in a multirun each job has its own folder: use hydra.sweep.dir, not output_dir")
    folder = Path(sweep_dir or Path("multirun") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")).resolve()
    plan = jobs([o for o in overrides if not o.startswith("hydra.sweep.dir=")])
    composed = [compose([*job, f"output_dir={folder / str(i)}"]) for i, job in enumerate(plan)]  # all fail early
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "multirun.yaml").write_text(
        yaml.safe_dump({"jobs": [{"id": i, "overrides": j} for i, j in enumerate(plan)]})
    )
    console.print(f"[bold]multirun[/]: {len(plan)} jobs -> {folder}")
    swept = [k for k in range(len(plan[0])) if len({job[k] for job in plan}) > 1]  # what differs between jobs
    rows = ["| job | swept values | final accuracy | best accuracy | wall min |", "|---|---|---|---|---|"]
    finals: dict[int, float | None] = {}
    for i, (job, (cfg, dict_config)) in enumerate(zip(plan, composed, strict=True)):
        console.print(f"job {i + 1}/{len(plan)} (folder {i}): {' '.join(job)}")
        started = time.perf_counter()
        simulate(cfg, dict_config, overrides=[*job, f"output_dir={folder / str(i)}"], dry_run=False, verbose=verbose)
        accuracy = [float(r["test_accuracy"]) for r in read_metrics(folder / str(i) / METRICS) if r["test_accuracy"]]
        final, best = (f"{accuracy[-1]:.4f}", f"{max(accuracy):.4f}") if accuracy else ("-", "-")
        values = " ".join(job[k] for k in swept) or "-"
        rows.append(f"| {i} | `{values}` | {final} | {best} | {(time.perf_counter() - started) / 60:.1f} |")
        finals[i] = accuracy[-1] if accuracy else None
        (folder / "summary.md").write_text("\n".join(rows + over_seeds(plan, swept, finals)) + "\n")
    console.print("\n".join(rows + over_seeds(plan, swept, finals)))
    return 0


def over_seeds(plan: list[list[str]], swept: list[int], finals: dict[int, float | None]) -> list[str]:
    """With ``seed`` swept: a row per setting of the other swept values, its final accuracy over the seeds."""
    seed_at = [k for k in swept if plan[0][k].split("=", 1)[0] == "seed"]
    if not seed_at:
        return []
    groups: dict[str, list[float]] = {}
    for i, job in enumerate(plan):
        if finals.get(i) is not None:
            key = " ".join(job[k] for k in swept if k not in seed_at) or "-"
            groups.setdefault(key, []).append(finals[i])  # type: ignore[arg-type]
    rows = ["", "| setting | final accuracy over seeds (mean ± 95% t CI) | n |", "|---|---|---|"]
    for key, values in groups.items():
        interval = t_interval(values)
        shown = interval.format().rsplit(" (n=", 1)[0]
        rows.append(f"| `{key}` | {shown} | {interval.n} |")
    return rows
