"""What a person sees: the run header, one line per round, tables, the partition and privacy summaries.

The library logs; only the CLI and this module print.
"""

from __future__ import annotations

import io
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # the console reads a worker, it never builds one
    from fedlora.learning.worker import Worker


# Piped (| tee run.log) or in CI, rich would wrap at 80 columns and cut table headers (repli..., epsi...):
# a wide page instead, so a log keeps each line whole. A terminal keeps its own width.
PIPED_WIDTH = 200
console = Console(stderr=False, width=None if sys.stdout.isatty() else PIPED_WIDTH, soft_wrap=not sys.stdout.isatty())
err_console = Console(
    stderr=True, width=None if sys.stderr.isatty() else PIPED_WIDTH, soft_wrap=not sys.stderr.isatty()
)


def human_bytes(n: float) -> str:
    """Bytes in decimal units: 304.40 KB, 1.52 MB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def header(worker: Worker, out: Path) -> str:
    """The run in one line: strategy, model and what trains, data, federation, output folder."""
    cfg, splits = worker.cfg, worker.data.splits
    trainable = sum(worker.adapted.params[k].numel() for k in worker.adapted.protocol.trained_in(1))
    adapter_ids = {id(p) for p in worker.adapted.params.values()}
    total = sum(p.numel() for p in worker.adapted.model.parameters() if id(p) not in adapter_ids)  # the base model
    ranks = sorted({worker.adapted.protocol.rank_mask(pid).rank for pid in range(cfg.clients)})
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]} by client"
    return (
        f"[bold]fedlora[/] strategy={cfg.strategy.name} model={cfg.model.name} "
        f"({trainable:,} of {total:,} parameters trainable; LoRA r={rank}, s={cfg.scaling:g}) "
        f"data={cfg.data.name} "
        f"({len(splits.train)} train / {len(splits.test)} test, {splits.num_labels} labels) "
        f"clients={cfg.clients} per round={cfg.sampled_per_round} rounds={cfg.rounds} -> {out}"
    )


def round_line(row: dict[str, Any], rounds: int) -> str:
    acc = row.get("test_accuracy")
    parts = [f"round {row['round']}/{rounds}"]
    loss, perplexity = row.get("test_loss"), row.get("test_perplexity")
    if acc is not None:
        parts.append(f"acc {acc:.4f} loss {loss:.4f}")
        if row.get("personal_accuracy") is not None:  # each client's model on its own test shard
            parts.append(f"personal {row['personal_accuracy']:.4f} worst 10% {row['personal_worst10']:.4f}")
    elif loss is not None:  # instruction data: no labels to score, the response loss and its perplexity
        parts.append(f"loss {loss:.4f}" + (f" ppl {perplexity:.3g}" if perplexity is not None else ""))
    else:
        parts.append("not evaluated")
    if row.get("train_loss") is not None:
        parts.append(f"train {row['train_loss']:.4f}")
    if row.get("replies_expected"):
        parts.append(f"{row['replies_received']}/{row['replies_expected']} replies")
        if row.get("refused"):
            parts.append(f"{row['refused']} refused (budget)")
        if row.get("epsilon_max") is not None:
            parts.append(f"eps max {row['epsilon_max']:.3g}")
        parts.append(f"up {human_bytes(row['bytes_up'])} down {human_bytes(row['bytes_down'])}")
    if row.get("clip_norm") is not None:  # privacy=user: no counts, the budget and the clip
        parts.append(f"eps {row['epsilon']:.3g} clip {row['clip_norm']:.3g}")
    parts.append(f"{row['wall_s']:.1f} s")
    return " | ".join(parts)


def summary_table(rows: list[dict[str, str]]) -> Table:
    table = Table(title="fedlora: rounds")
    eps_key = next((k for k in ("epsilon_max", "epsilon") if rows and k in rows[0]), None)
    personal = bool(rows) and "personal_accuracy" in rows[0]
    names = ("round", "test acc", *(("personal", "worst 10%") if personal else ()), "test loss", "train loss",
             "replies", "up", "down", "wall s")  # fmt: skip
    for name in (*names, "epsilon") if eps_key else names:
        table.add_column(name, justify="right")
    for r in rows:
        extra = (_fmt(r[eps_key], ".3g"),) if eps_key else ()
        mine = (_fmt(r["personal_accuracy"], ".4f"), _fmt(r["personal_worst10"], ".4f")) if personal else ()
        replies = f"{r['replies_received']}/{r['replies_expected']}" if r["replies_expected"] not in ("", "0") else ""
        table.add_row(
            r["round"],
            _fmt(r["test_accuracy"], ".4f"),
            *mine,
            _fmt(r["test_loss"], ".4f"),
            _fmt(r["train_loss"], ".4f"),
            replies,
            human_bytes(float(r["bytes_up"])) if r["bytes_up"] not in ("", "0") else "",
            human_bytes(float(r["bytes_down"])) if r["bytes_down"] not in ("", "0") else "",
            _fmt(r["wall_s"], ".1f"),
            *extra,
        )
    return table


def summary_text(metrics_csv: Path) -> str:
    """The rounds table as plain text (for logs that are not a terminal)."""
    from fedlora.outputs.metrics import read_metrics

    plain = Console(width=100, record=True, file=io.StringIO(), color_system=None)
    plain.print(summary_table(read_metrics(metrics_csv)))
    return plain.export_text()


def _fmt(value: str, spec: str) -> str:
    return format(float(value), spec) if value not in ("", None) else ""


def show_user_privacy(worker: Worker) -> None:
    """privacy=user: the server's plan (rate, noise, clip, planned epsilon) and the noise over the signal."""
    from fedlora.privacy.dp_sgd import UNSAFE_WARNING
    from fedlora.privacy.user_level import UserLevelDP

    cfg = worker.cfg
    if cfg.privacy.unsafe_seeded_randomness:
        err_console.print(f"[bold red]warning:[/] {UNSAFE_WARNING}", highlight=False, soft_wrap=True)
    dp = UserLevelDP(cfg)
    randomness = "NOT PRIVATE (seeded)" if cfg.privacy.unsafe_seeded_randomness else "private (OS entropy)"
    d = sum(worker.adapted.params[k].numel() for k in worker.adapted.protocol.trained_in(1))
    ratio = dp.z_update * d**0.5 / dp.expected
    console.print(f"privacy=user ({cfg.privacy.accountant}): {dp.header()}; cohort and noise: {randomness}")
    console.print(
        f"  {d:,} numbers averaged per client; noise/signal per round {ratio:.2g} (z sqrt(d) / m: the noise norm "
        f"over the largest clipped mean){noise_verdict(ratio, cfg.rounds, 'rounds')}"
    )


def noise_verdict(ratio: float, steps: int, what: str) -> str:
    """A warning only when it holds: over ``steps`` noisy steps the noise grows as sqrt(steps) and a consistent
    signal as steps, so the run's noise/signal is ``ratio / sqrt(steps)``; above 1 the noise outweighs even
    the whole run's signal. Else nothing."""
    overall = ratio / math.sqrt(max(1, steps))
    if overall <= 1:
        return ""
    return f"; over the run's {steps} {what} still {overall:.2g} (> 1): the noise outweighs the signal"


def show_privacy(worker: Worker) -> None:
    """Every client's DP-SGD plan, summarised: noise, delta, scheduled rounds, planned spend."""
    from fedlora.privacy.accounting import epsilon
    from fedlora.privacy.dp_sgd import UNSAFE_WARNING

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
    weighting = cfg.strategy.weighting
    if weighting == "examples":
        weighting += " (declared public)" if cfg.privacy.public_counts else " (noised label counts)"
    # Per step the mean of clipped gradients has norm <= C; the noise on it has norm sigma C sqrt(d) / B.
    d = sum(worker.adapted.params[k].numel() for k in worker.adapted.protocol.trained_in(1))
    ratio = [p.noise_multiplier * d**0.5 / (p.sample_rate * len(worker.data.rows(pid))) for pid, p in enumerate(plans)
             if p.rounds or p.init_release]  # fmt: skip
    console.print(
        f"privacy=dp ({budget}, {cfg.privacy.accountant}, {cfg.privacy.grad_sample_mode}): noise multiplier "
        f"{min(sigmas):.3g}..{max(sigmas):.3g}, clip {cfg.privacy.max_grad_norm:g}, delta "
        f"{min(p.delta for p in active):.2g}..{max(p.delta for p in active):.2g}, "
        f"{min(p.rounds for p in active)}..{max(p.rounds for p in active)} rounds per client, "
        f"planned epsilon {min(planned):.3g}..{max(planned):.3g}; weighting {weighting}; "
        f"noise and sampling: {randomness}"
    )
    console.print(
        f"  per client: sample rate {min(p.sample_rate for p in active):.3g}..{max(p.sample_rate for p in active):.3g}"
        f", {active[0].steps} steps of an expected batch of {cfg.train.batch_size} per round, {d:,} trainable numbers; "
        f"noise/signal per step {min(ratio):.2g}..{max(ratio):.2g} (sigma sqrt(d) / batch: the noise norm over the "
        f"largest clipped mean){noise_verdict(min(ratio), min(p.steps * p.rounds for p in active), 'steps')}"
    )
    if cfg.train.logit_adjustment:
        console.print(
            f"  logit adjustment (tau {cfg.train.logit_adjustment:g}) from label counts + N(0, "
            f"{cfg.privacy.label_noise:g}^2), drawn and charged each round (privacy.label_noise)"
        )


MAX_LABEL_COLUMNS = 8  # more labels: each client's label count and largest label instead of a column each


def show_partitions(worker: Worker) -> Any:
    """Per-client sizes and label counts, summarised on the console; the counts, (clients, labels)."""
    import numpy as np

    from fedlora.learning.data import label_counts, label_skew

    labels = worker.data.splits.train["label"]
    counts = label_counts(labels, worker.data.partitions, worker.data.splits.num_labels)
    sizes = counts.sum(1)
    cfg = worker.cfg
    table = Table(title=f"partition={cfg.partition.name}: {cfg.clients} clients", title_justify="left")
    table.add_column("client", justify="right")
    table.add_column("examples", justify="right")
    names = worker.data.splits.label_names
    many = len(names) > MAX_LABEL_COLUMNS  # a column per label would be cut to unreadable "c…" columns
    columns = ["labels held", "largest label (share)"] if many else [name[:12] for name in names]
    for name in columns:
        table.add_column(name, justify="right")
    shown = list(range(min(len(sizes), 8)))
    for i in shown:
        if many:
            top = int(np.argmax(counts[i]))
            cells = [f"{int((counts[i] > 0).sum())} of {len(names)}", f"{names[top]} ({counts[i][top] / sizes[i]:.0%})"]
        else:
            cells = list(map(str, counts[i]))
        table.add_row(str(i), str(sizes[i]), *cells)
    if len(sizes) > len(shown):
        table.add_row(f"... {len(sizes) - len(shown)} more", "", *[""] * len(columns))
    console.print(table)
    console.print(
        f"examples per client: min {sizes.min()}  median {int(np.median(sizes))}  max {sizes.max()}  "
        f"total {sizes.sum()};  label skew (mean TV distance to the global mix) {label_skew(counts):.3f}"
    )
    return counts


_EXPECTED_FLOWER_NOTICES = ("DEPRECATED FEATURE: The `run_simulation`",)  # the simulation API this project uses


def _quiet_flower(record: logging.LogRecord) -> bool:
    """Flower's warnings and errors, less the notice that every simulation triggers and, once the run is
    stopping, the clients' stopped rounds it reports as errors."""
    from fedlora.federation.stopping import STOP

    return (
        record.levelno >= logging.WARNING
        and not record.getMessage().startswith(_EXPECTED_FLOWER_NOTICES)
        and not STOP.is_set()
    )


def _not_file_only(record: logging.LogRecord) -> bool:
    """False for a routine per-round record logged with ``extra={"file_only": True}``: server.log keeps it."""
    return not getattr(record, "file_only", False)


def setup_logging(verbose: bool) -> None:
    """Log records through rich on stderr; Flower's and the libraries' chatter only with ``verbose``
    (and the records marked ``file_only``, which otherwise only ``server.log`` keeps)."""
    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_path=False)
    if not verbose:
        handler.addFilter(_not_file_only)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
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
        quiet_libraries()


def quiet_libraries() -> None:
    """No progress bars or notices from datasets and transformers, no known deprecation chatter."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # Ray's notice about a future default; num_gpus=0 must keep hiding GPUs, as it does now.
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)
    import datasets
    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # the Hub client's retries when it is unreachable (five warnings over 23 s offline) end in an error that
    # fedlora states in one line
    huggingface_hub.utils.logging.set_verbosity_error()
