"""The sweep report's figures: accuracy against epsilon (error bars, and bands for the no-DP lines: 95% t intervals
over seeds), against the round (the mean over seeds with its interval as a band), and against the cumulative upload.

One encoding throughout: colour is the strategy, the marker and line style the strategy too, so a
figure reads in grey; markers of strategies at the same epsilon are set slightly apart so that none
hides another. Each figure is written as PNG (the HTML embeds it) and as PDF and SVG (vector, for a
paper), with no title baked in.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedlora.outputs.stats import t_interval

PLOTS = ("accuracy_vs_epsilon.png", "accuracy_vs_round.png", "accuracy_vs_upload.png")
VECTOR = (".pdf", ".svg")  # each figure also in these formats, beside its PNG
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)), (0, (5, 2, 1, 2)))
CENTRALISED = "centralised"  # the sweep's reference cell (fedlora.commands.sweep.CENTRALISED)


def eps_label(epsilon: float) -> str:
    return "inf (no DP)" if math.isinf(epsilon) else f"{epsilon:g}"


def plot(cells: list[Any], folder: Path) -> None:
    """The three figures, as PNGs in ``folder``; ``cells``: the report's ``CellResult`` of every finished cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    federated = [c for c in cells if c.strategy != CENTRALISED]
    strategies = sorted({c.strategy for c in federated})
    style = {s: (f"C{i}", MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)]) for i, s in enumerate(strategies)}
    _accuracy_vs_epsilon(plt, cells, federated, strategies, style, folder / PLOTS[0])
    _accuracy_vs_round(plt, cells, style, folder / PLOTS[1])
    _accuracy_vs_upload(plt, federated, style, folder / PLOTS[2])


def _save(plt, fig, path: Path, *, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    for suffix in VECTOR:
        fig.savefig(path.with_suffix(suffix))
    plt.close(fig)


def _accuracy_vs_epsilon(plt, cells, federated, strategies, style, path: Path) -> None:
    finite = sorted({c.epsilon for c in federated if not math.isinf(c.epsilon)})
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, s in enumerate(strategies):
        colour, marker, line = style[s]
        shift = 1 + 0.04 * (i - (len(strategies) - 1) / 2)  # strategies side by side on the log axis
        points = []
        for e in finite:
            iv = t_interval([c.final for c in federated if c.strategy == s and c.epsilon == e])
            if iv.n:
                points.append((e * shift, iv.mean, iv.half_width if iv.n > 1 else 0.0))
        if points:
            xs, ys, errs = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=errs, color=colour, marker=marker, linestyle=line, capsize=3, markersize=7,
                        label=f"{s}, DP")  # fmt: skip
        plain = t_interval([c.final for c in federated if c.strategy == s and math.isinf(c.epsilon)])
        if plain.n:
            ax.axhline(plain.mean, color=colour, linestyle="--", linewidth=1, alpha=0.7, label=f"{s}, no DP")
            if plain.n > 1:  # its interval as a band (within [0, 1]), as the DP points have theirs as bars
                ax.axhspan(max(plain.low, 0.0), min(plain.high, 1.0), color=colour, alpha=0.08)
    reference = t_interval([c.final for c in cells if c.strategy == CENTRALISED])
    if reference.n:
        ax.axhline(reference.mean, color="black", linewidth=1.6, label="centralised, no DP")
    labels = {c.labels for c in cells if c.labels}
    if len(labels) == 1:
        ax.axhline(1 / labels.pop(), color="grey", linestyle=":", linewidth=1.2, label="chance")
    if finite:
        ax.set_xscale("log")
        ax.set_xticks(finite, [f"{e:g}" for e in finite])
        ax.set_xlim(finite[0] / 1.6, finite[-1] * 1.6)  # one epsilon: its strategies side by side, not axis-wide
        ax.minorticks_off()
    seeds = max((len({c.seed for c in federated if c.strategy == s}) for s in strategies), default=0)
    bars = "bars and bands: 95% t intervals over seeds" if seeds > 1 else "one seed: no error bars"
    ax.set(xlabel=f"epsilon per client (log scale; {bars})", ylabel="final test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _save(plt, fig, path, dpi=120)


def _accuracy_vs_round(plt, cells, style, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    groups = sorted({c.strategy for c in cells}, key=lambda s: (s != CENTRALISED, s))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.8 * len(groups), 3.6), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], groups, strict=True):
        by_epsilon: dict[float, list] = defaultdict(list)
        for c in cells:
            if c.strategy == s:
                by_epsilon[c.epsilon].append(c)
        for j, (epsilon, runs) in enumerate(sorted(by_epsilon.items())):
            rounds = sorted(set.intersection(*(set(c.rounds) for c in runs)))
            per_round = [t_interval([c.accuracy[c.rounds.index(r)] for c in runs]) for r in rounds]
            mean = [iv.mean for iv in per_round]
            line = ax.plot(rounds, mean, marker=MARKERS[j % len(MARKERS)], linestyle=LINESTYLES[j % len(LINESTYLES)],
                           markersize=4, label=f"eps {eps_label(epsilon)} (n={len(runs)})")[0]  # fmt: skip
            if len(runs) > 1:  # drawn within [0, 1]: a t interval of 3 seeds can pass an accuracy's bounds
                ax.fill_between(rounds, [max(iv.low, 0.0) for iv in per_round], [min(iv.high, 1.0) for iv in per_round],
                                color=line.get_color(), alpha=0.15, linewidth=0)  # fmt: skip
        ax.set(title=s, xlabel="round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy (band: 95% t interval)")
    _save(plt, fig, path, dpi=110)


def _accuracy_vs_upload(plt, federated, style, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, c in enumerate(sorted(federated, key=lambda c: (c.strategy, c.epsilon, c.seed))):
        colour, marker, _ = style[c.strategy]
        cumulative = [0.0]
        for b in c.upload:
            cumulative.append(cumulative[-1] + b)
        ax.plot([x / 1e6 for x in cumulative[: len(c.accuracy)]], c.accuracy, color=colour, marker=marker,
                linestyle=LINESTYLES[i % len(LINESTYLES)], markersize=4,
                label=f"{c.strategy}, eps {eps_label(c.epsilon)}, seed {c.seed}")  # fmt: skip
    ax.set(xlabel="cumulative upload, all clients (MB)", ylabel="test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _save(plt, fig, path, dpi=120)
