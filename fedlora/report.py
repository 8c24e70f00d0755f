"""A sweep's report: report.md and report.html with a table and PNG plots beside them.

    fedlora report <sweep dir>

Reads every finished cell (``cells/<strategy>/eps-<e>/seed-<s>/metrics.csv``) and
writes, in the sweep folder: ``report.md``, ``report.html`` (the same content; the
images are referenced relatively, so the folder can be zipped and shared) and
``accuracy_vs_epsilon.png``, ``accuracy_vs_round.png``, ``accuracy_vs_upload.png``.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fedlora.console import human_bytes
from fedlora.metrics import METRICS, read_metrics
from fedlora.privacy import NOT_PRIVATE_COLUMN
from fedlora.sweep import CELL

PLOTS = ("accuracy_vs_epsilon.png", "accuracy_vs_round.png", "accuracy_vs_upload.png")


@dataclass
class CellResult:
    strategy: str
    epsilon: float
    seed: int
    rounds: list[int]
    accuracy: list[float]
    upload: list[float]  # bytes per round
    spent: float | None  # the largest epsilon any client reported
    refused: int
    private: bool = True  # False: DP randomness was seeded (privacy.unsafe_seeded_randomness)

    @property
    def final(self) -> float:
        return self.accuracy[-1]


def load_cells(folder: Path) -> list[CellResult]:
    cells = []
    for marker in sorted(folder.glob(f"cells/*/*/*/{CELL}")):
        meta = json.loads(marker.read_text())
        rows = [r for r in read_metrics(marker.parent / METRICS) if r["test_accuracy"]]
        trained = [r for r in rows if int(r["round"]) > 0]
        spent = [float(r["epsilon_max"]) for r in rows if r.get("epsilon_max")]
        cells.append(
            CellResult(
                strategy=meta["strategy"],
                epsilon=float(meta["epsilon"]),
                seed=int(meta["seed"]),
                rounds=[int(r["round"]) for r in rows],
                accuracy=[float(r["test_accuracy"]) for r in rows],
                upload=[float(r["bytes_up"] or 0) for r in trained],
                spent=max(spent) if spent else None,
                refused=sum(int(r.get("refused") or 0) for r in rows),
                private=not any(r.get(NOT_PRIVATE_COLUMN) for r in rows),
            )
        )
    return cells


def eps_label(epsilon: float) -> str:
    return "inf (no DP)" if math.isinf(epsilon) else f"{epsilon:g}"


def table(cells: list[CellResult]) -> tuple[list[str], list[list[str]]]:
    """strategy x epsilon: final accuracy mean +- std over seeds, epsilon spent, upload per round."""
    groups: dict[tuple[str, float], list[CellResult]] = defaultdict(list)
    for c in cells:
        groups[(c.strategy, c.epsilon)].append(c)
    header = [
        "strategy",
        "target epsilon",
        "seeds",
        "final accuracy",
        "best accuracy",
        "epsilon spent (max client)",
        "refused rounds",
        "upload per round",
    ]
    body = []
    for (strategy, epsilon), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        finals = [c.final for c in group]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        spent = [c.spent for c in group if c.spent is not None]
        uploads = [sum(c.upload) / len(c.upload) for c in group if c.upload]
        body.append(
            [
                strategy,
                eps_label(epsilon) + ("" if all(c.private for c in group) else " (NOT PRIVATE: seeded noise)"),
                str(len(group)),
                f"{statistics.mean(finals):.3f} ± {std:.3f}",
                f"{statistics.mean(max(c.accuracy) for c in group):.3f}",
                f"{max(spent):.3f}" if spent else "-",
                str(sum(c.refused for c in group)),
                human_bytes(statistics.mean(uploads)) if uploads else "-",
            ]
        )
    return header, body


def plot(cells: list[CellResult], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    strategies = sorted({c.strategy for c in cells})
    epsilons = sorted({c.epsilon for c in cells})
    positions = {e: i for i, e in enumerate(epsilons)}  # inf as the last category, not at infinity

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for s in strategies:
        means = []
        for e in epsilons:
            finals = [c.final for c in cells if c.strategy == s and c.epsilon == e]
            means.append((positions[e], statistics.mean(finals), statistics.stdev(finals) if len(finals) > 1 else 0))
        if means:
            xs, ys, errs = zip(*means, strict=True)
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=s)
    ax.set_xticks(range(len(epsilons)), [eps_label(e) for e in epsilons])
    ax.set(xlabel="target epsilon per client", ylabel="final test accuracy", title="Accuracy vs privacy budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / PLOTS[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(strategies), figsize=(4 * len(strategies), 3.6), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], strategies, strict=True):
        for c in sorted((c for c in cells if c.strategy == s), key=lambda c: (c.epsilon, c.seed)):
            ax.plot(c.rounds, c.accuracy, marker=".", label=f"eps {eps_label(c.epsilon)}, seed {c.seed}")
        ax.set(title=s, xlabel="round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(folder / PLOTS[1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for c in sorted(cells, key=lambda c: (c.strategy, c.epsilon, c.seed)):
        cumulative = [0.0]
        for b in c.upload:
            cumulative.append(cumulative[-1] + b)
        ax.plot(
            [x / 1e6 for x in cumulative[: len(c.accuracy)]],
            c.accuracy,
            marker=".",
            label=f"{c.strategy}, eps {eps_label(c.epsilon)}, seed {c.seed}",
        )
    ax.set(xlabel="cumulative upload, all clients (MB)", ylabel="test accuracy", title="Accuracy vs upload")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(folder / PLOTS[2], dpi=120)
    plt.close(fig)


def write_report(folder: Path) -> Path:
    """report.md and report.html (and the PNGs) for the sweep in ``folder``; returns the HTML's path."""
    folder = Path(folder)
    cells = load_cells(folder)
    if not cells:
        raise FileNotFoundError(f"no finished cells under {folder / 'cells'}")
    header, body = table(cells)
    plot(cells, folder)
    sweep = json.loads((folder / "sweep.json").read_text()) if (folder / "sweep.json").is_file() else {}
    run = " ".join(sweep.get("overrides", [])) or "(defaults)"
    title = "fedlora privacy sweep"
    notes = (
        f"{len(cells)} finished cells. Every cell: `fedlora simulate {run}` with the cell's strategy, seed "
        "and privacy. Target epsilon is per client over the whole run (sample-level DP-SGD, delta as in the "
        "run's config); 'epsilon spent' is the largest epsilon any client reported; upload is all clients' "
        "bytes per round, as sent."
    )
    md = [f"# {title}", "", notes, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in body]
    md += [""] + [f"![{name[:-4].replace('_', ' ')}]({name})" for name in PLOTS]
    (folder / "report.md").write_text("\n".join(md) + "\n")

    cells_html = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in body)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f2f2f2; }} td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; margin: 1em 0; border: 1px solid #eee; }}
code {{ background: #f6f6f6; padding: 1px 4px; }}
</style></head><body>
<h1>{title}</h1>
<p>{html.escape(notes).replace("`", "")}</p>
<table><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr></thead>
<tbody>{cells_html}</tbody></table>
{"".join(f'<img src="{name}" alt="{name[:-4].replace("_", " ")}">' for name in PLOTS)}
</body></html>
"""
    out = folder / "report.html"
    out.write_text(page)
    return out
