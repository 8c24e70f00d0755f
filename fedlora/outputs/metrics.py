"""metrics.csv: its columns (the one schema), a round's numbers, and the log itself.

One row per round (round 0 is the model before training, plus Fed-SB's one-off
gradient upload): central test accuracy and loss, the clients' mean training loss
(empty under DP: a loss on private batches is never sent), replies expected,
received and rejected, numbers and bytes up and down as sent, wall time; under DP
the budget columns (under user-level DP: epsilon, the clip and the noisy fraction of
updates under it, and no counts, bytes or losses, which would tell the cohort); then
the strategy's own diagnostics (LoRA-FAIR's residuals).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config.federated import PrivacyConfig
from fedlora.privacy.dp_sgd import NOT_PRIVATE, NOT_PRIVATE_COLUMN

COLUMNS = (
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "replies_expected",
    "replies_received",
    "replies_rejected",
    "numbers_up",
    "bytes_up",
    "numbers_down",
    "bytes_down",
    "wall_s",
)
PRIVACY_COLUMNS = ("refused", "epsilon_max", "epsilon_mean")
USER_COLUMNS = ("epsilon", "clip_norm", "clip_fraction")  # privacy=user: spent so far, the bound, noisy share under it
# privacy=user: what would reveal the cohort's size or its data outside the noisy mean (server.log keeps it)
HIDDEN_UNDER_USER_DP = (
    "train_loss", "replies_expected", "replies_received", "replies_rejected", "numbers_up", "bytes_up",
    "numbers_down", "bytes_down",
)  # fmt: skip


def columns(privacy: PrivacyConfig, strategy_columns: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The run's columns: the common ones, the budget's under DP (and the NOT PRIVATE mark), the strategy's."""
    dp = PRIVACY_COLUMNS if privacy.enabled else USER_COLUMNS if privacy.user_level else ()
    unsafe = (NOT_PRIVATE_COLUMN,) if privacy.any and privacy.unsafe_seeded_randomness else ()
    return (*COLUMNS, *dp, *unsafe, *strategy_columns)


@dataclass
class RoundStats:
    """Communication and timing of one round, measured from the real payloads."""

    started: float = field(default_factory=time.perf_counter)
    replies_expected: int = 0
    replies_received: int = 0  # arrived in time, without error
    replies_rejected: int = 0  # arrived but failed validation
    numbers_up: int = 0
    bytes_up: int = 0
    numbers_down: int = 0
    bytes_down: int = 0
    train_loss: float | None = None
    report: dict[str, float] = field(default_factory=dict)  # the strategy's own diagnostics
    refused: int = 0  # clients whose privacy budget is exhausted
    epsilons: list[float] = field(default_factory=list)  # epsilon spent so far by each replying client

    def add_up(self, size: tuple[int, int]) -> None:
        self.numbers_up += size[0]
        self.bytes_up += size[1]

    def add_down(self, size: tuple[int, int]) -> None:
        self.numbers_down += size[0]
        self.bytes_down += size[1]


def round_row(
    server_round: int,
    evaluation: Mapping[str, float],
    stats: RoundStats | None,
    *,
    privacy: PrivacyConfig,
    wall_s: float,
) -> dict[str, Any]:
    """A metrics.csv row: ``evaluation`` (accuracy, loss; empty when not due) and ``stats`` (None: no exchange)."""
    row: dict[str, Any] = {
        "round": server_round,
        "test_accuracy": evaluation.get("accuracy"),
        "test_loss": evaluation.get("loss"),
        "wall_s": wall_s,
    } | {k: v for k, v in evaluation.items() if k not in ("accuracy", "loss")}  # the task's own (perplexity...)
    if stats is not None:
        row |= {
            "train_loss": stats.train_loss,
            "replies_expected": stats.replies_expected,
            "replies_received": stats.replies_received,
            "replies_rejected": stats.replies_rejected,
            "numbers_up": stats.numbers_up,
            "bytes_up": stats.bytes_up,
            "numbers_down": stats.numbers_down,
            "bytes_down": stats.bytes_down,
            **stats.report,
        }
        if privacy.enabled:
            eps = stats.epsilons
            row |= {
                "refused": stats.refused,
                "epsilon_max": max(eps) if eps else None,
                "epsilon_mean": sum(eps) / len(eps) if eps else None,
            }
        if privacy.user_level:
            row |= dict.fromkeys(HIDDEN_UNDER_USER_DP)
    if privacy.any and privacy.unsafe_seeded_randomness:
        row[NOT_PRIVATE_COLUMN] = NOT_PRIVATE
    return row


class MetricsLog:
    """metrics.csv, with ``columns`` in order; a resumed run keeps the rows up to its checkpoint."""

    def __init__(
        self,
        path: Path,
        columns: tuple[str, ...] = COLUMNS,
        *,
        resume_after: int | None = None,
        trackers: list[Any] = (),
    ) -> None:
        """A new log, or (``resume_after``) the existing one cut after that round (a resumed run).

        ``trackers`` (:mod:`fedlora.outputs.tracking`) get every appended row too.
        """
        self.path = path
        self.columns = columns
        self.trackers = list(trackers)
        kept = []
        if resume_after is not None and path.exists():
            kept = [r for r in read_metrics(path) if int(r["round"]) <= resume_after]
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            writer.writerows([[r.get(c, "") for c in self.columns] for r in kept])

    def append(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"not metric columns: {sorted(unknown)}")
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_cell(row.get(c)) for c in self.columns])
        for tracker in self.trackers:
            tracker.log(row)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def summarise(path: Path) -> dict[str, Any]:
    """A run's outcome from its metrics.csv: last test accuracy and loss, the largest epsilon spent, rounds."""
    rows = read_metrics(path)
    evaluated = [r for r in rows if r["test_accuracy"]]
    spent = [float(r[k]) for r in rows for k in ("epsilon_max", "epsilon") if r.get(k)]
    return {
        "rounds": int(rows[-1]["round"]) if rows else 0,
        "test_accuracy": float(evaluated[-1]["test_accuracy"]) if evaluated else None,
        "test_loss": float(evaluated[-1]["test_loss"]) if evaluated else None,
        "epsilon_spent": max(spent) if spent else None,
    }
