"""A sweep's report: report.md and a single-file report.html (figures embedded), with the PNGs beside them.

    fedlora report <sweep dir>

Reads every finished cell (``cells/<strategy>/eps-<e>/seed-<s>/metrics.csv``) and the
sweep's ``sweep.json`` (its command, start, fedlora version), and writes in the sweep
folder: ``report.md``, ``report.html`` (the same content, figures as data URIs, so the
one file can be mailed) and ``accuracy_vs_epsilon.png``, ``accuracy_vs_round.png``,
``accuracy_vs_upload.png``. The accuracy-vs-epsilon figure draws each strategy's
private cells with its own marker and line style, its non-private accuracy as a
dashed line in its colour, the centralised reference and the chance level.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.commands.report_figures import PLOTS, eps_label, plot
from fedlora.commands.sweep import CELL, CENTRALISED, SWEEP
from fedlora.outputs.console import human_bytes
from fedlora.outputs.metrics import read_metrics
from fedlora.outputs.run_folder import ADAPTER_DIR, EXPORT_LABELS, METRICS
from fedlora.outputs.stats import TAIL, paired_difference, t_interval, tail_mean, verdict
from fedlora.privacy.dp_sgd import NOT_PRIVATE_COLUMN


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
    labels: int | None = None  # classes, when the cell's adapter names them
    download: list[float] = field(default_factory=list)  # bytes per round
    personal: tuple[float, float] | None = None  # the last evaluation's personalised accuracy: mean, worst tenth

    @property
    def final(self) -> float:
        return self.accuracy[-1]

    @property
    def tail(self) -> float | None:
        """:func:`~fedlora.outputs.stats.tail_mean` over the evaluated rounds after round 0."""
        return tail_mean([a for r, a in zip(self.rounds, self.accuracy, strict=True) if r > 0])


def load_cells(folder: Path) -> list[CellResult]:
    cells = []
    for marker in sorted(folder.glob(f"cells/*/*/*/{CELL}")):
        meta = json.loads(marker.read_text())
        rows = [r for r in read_metrics(marker.parent / METRICS) if r["test_accuracy"]]
        trained = [r for r in rows if int(r["round"]) > 0]
        spent = [float(r[k]) for r in rows for k in ("epsilon_max", "epsilon") if r.get(k)]
        labels = marker.parent / ADAPTER_DIR / EXPORT_LABELS
        cells.append(
            CellResult(
                strategy=meta["strategy"],
                epsilon=float(meta["epsilon"]),
                seed=int(meta["seed"]),
                rounds=[int(r["round"]) for r in rows],
                accuracy=[float(r["test_accuracy"]) for r in rows],
                upload=[float(r["bytes_up"] or 0) for r in trained],
                download=[float(r["bytes_down"] or 0) for r in trained],
                personal=personal_of(rows),
                spent=max(spent) if spent else None,
                refused=sum(int(r.get("refused") or 0) for r in rows),
                private=not any(r.get(NOT_PRIVATE_COLUMN) for r in rows),
                labels=len(json.loads(labels.read_text())) if labels.is_file() else None,
            )
        )
    return cells


def personal_of(rows: list[dict]) -> tuple[float, float] | None:
    """The last evaluated round's personalised accuracy (mean, worst tenth), when the run measured it."""
    last = rows[-1] if rows else {}
    if last.get("personal_accuracy") in (None, ""):
        return None
    return float(last["personal_accuracy"]), float(last["personal_worst10"])


def _spread(values: list[float]) -> str:
    """mean ± the 95% t interval's half-width over seeds; with one seed the value alone (no interval; the seeds
    column says how many)."""
    interval = t_interval(values)
    if interval.n == 1:
        return f"{interval.mean:.3f}"
    return f"{interval.mean:.3f} ± {interval.half_width:.3f}"


def comparisons(cells: list[CellResult], baseline: str = "fedavg") -> list[str]:
    """Each strategy against ``baseline`` at each epsilon, on paired seeds, after ``baseline`` against the
    centralised reference where there is one: final accuracy; the mean of the last :data:`TAIL` rounds, where
    both ran ``2 * TAIL`` or more; personalised accuracy, where both measured it (the same seed gives both the
    same clients' test shards)."""
    finals: dict[tuple[str, float], dict[int, float]] = defaultdict(dict)
    tails: dict[tuple[str, float], dict[int, float]] = defaultdict(dict)
    personal: dict[tuple[str, float], dict[int, float]] = defaultdict(dict)
    for c in cells:
        finals[(c.strategy, c.epsilon)][c.seed] = c.final
        if (tail := c.tail) is not None:  # a property over every round: read once
            tails[(c.strategy, c.epsilon)][c.seed] = tail
        if c.personal:
            personal[(c.strategy, c.epsilon)][c.seed] = c.personal[0]
    reference = {(baseline, math.inf), (CENTRALISED, math.inf)} <= set(finals)  # how close federated gets to pooled
    pairs = [(baseline, math.inf, CENTRALISED)] if reference else []
    pairs += [(s, e, baseline) for s, e in sorted(finals, key=lambda k: (k[1], k[0]))
              if s not in (baseline, CENTRALISED) and (baseline, e) in finals]  # fmt: skip
    out = []
    for strategy, epsilon, other in pairs:
        where = "without DP" if math.isinf(epsilon) else f"at epsilon {epsilon:g}"
        out.append(verdict(strategy, other, paired_difference(finals[(strategy, epsilon)], finals[(other, epsilon)]),
                           what=where))  # fmt: skip
        for measure, label in ((tails, f"mean of the last {TAIL} rounds"), (personal, "personalised")):
            mine, theirs = measure.get((strategy, epsilon), {}), measure.get((other, epsilon), {})
            if set(mine) & set(theirs):
                out.append(verdict(strategy, other, paired_difference(mine, theirs), what=f"{where}, {label}"))
    return out


def table(cells: list[CellResult]) -> tuple[list[str], list[list[str]]]:
    """strategy x epsilon (the centralised reference first): final accuracy over seeds, epsilon spent, upload."""
    groups: dict[tuple[str, float], list[CellResult]] = defaultdict(list)
    for c in cells:
        groups[(c.strategy, c.epsilon)].append(c)
    header = [
        "strategy",
        "target epsilon",
        "seeds",
        "final accuracy (mean ± 95% t CI)",
        "best accuracy",
        "epsilon spent",
        "refused rounds",
        "upload per round",
        "download per round",
    ]
    personal = any(c.personal for c in cells)
    if personal:
        header[4:4] = ["personalised (mean ± CI)", "worst 10% of clients"]
    body = []
    for (strategy, epsilon), group in sorted(groups.items(), key=lambda kv: (kv[0][0] != CENTRALISED, kv[0])):
        spent = [c.spent for c in group if c.spent is not None]
        uploads = [sum(c.upload) / len(c.upload) for c in group if c.upload and sum(c.upload)]
        downloads = [sum(c.download) / len(c.download) for c in group if c.download and sum(c.download)]
        not_private = "" if all(c.private for c in group) else " (NOT PRIVATE: seeded noise)"
        mine = [c.personal for c in group if c.personal]
        row = [
            "centralised (reference)" if strategy == CENTRALISED else strategy,
            eps_label(epsilon) + not_private,
            str(len(group)),
            _spread([c.final for c in group]),
            f"{statistics.mean(max(c.accuracy) for c in group):.3f}",
            f"{max(spent):.3f}" if spent else "-",
            str(sum(c.refused for c in group)),
            human_bytes(statistics.mean(uploads)) if uploads else "-",
            human_bytes(statistics.mean(downloads)) if downloads else "-",
        ]
        if personal:
            row[4:4] = (
                [_spread([m[0] for m in mine]), f"{statistics.mean(m[1] for m in mine):.3f}"] if mine else ["-"] * 2
            )
        body.append(row)
    return header, body


def write_table_files(folder: Path, header: list[str], body: list[list[str]]) -> None:
    """The report's table as ``report.csv`` and as a LaTeX ``tabular`` (booktabs) in ``report.tex``."""
    import csv

    with (folder / "report.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(body)

    def tex(text: str) -> str:
        for plain, escaped in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"),
                               ("#", "\\#")):  # fmt: skip
            text = text.replace(plain, escaped)
        return text.replace("±", "$\\pm$")

    columns = "l" + "r" * (len(header) - 1)
    lines = ["% fedlora sweep report (needs \\usepackage{booktabs})", f"\\begin{{tabular}}{{{columns}}}",
             "\\toprule", " & ".join(tex(h) for h in header) + " \\\\", "\\midrule"]  # fmt: skip
    lines += [" & ".join(tex(v) for v in row) + " \\\\" for row in body]
    lines += ["\\bottomrule", "\\end{tabular}"]
    (folder / "report.tex").write_text("\n".join(lines) + "\n")


CHANCE_MARGIN = 0.05  # a cell within this of 1 / classes has learned nothing one could compare


def at_chance(cells: list[CellResult]) -> str | None:
    """The warning a report leads with when every cell ends within ``CHANCE_MARGIN`` of chance (None: some
    cell learned, or the number of classes is unknown)."""
    classes = {c.labels for c in cells}
    if None in classes or len(classes) != 1 or not cells:
        return None
    (k,) = classes
    if any(abs(c.final - 1 / k) > CHANCE_MARGIN for c in cells):
        return None
    return (
        f"Every cell ends within {CHANCE_MARGIN * 100:.0f} points of chance (1/{k} = {1 / k:.3f}): nothing here "
        "learned, so the differences between cells are noise. Train longer (rounds, train.local_steps), or use "
        "a model and data that learn (docs/usage.md)."
    )


def write_report(folder: Path) -> Path:
    """report.md and report.html (and the PNGs) for the sweep in ``folder``; returns the HTML's path."""
    folder = Path(folder)
    cells = load_cells(folder)
    if not cells:
        raise FileNotFoundError(f"no finished cells under {folder / 'cells'}")
    header, body = table(cells)
    plot(cells, folder)
    sweep = json.loads((folder / SWEEP).read_text()) if (folder / SWEEP).is_file() else {}
    overrides = sweep.get("overrides", [])
    setting = {k: v for k, _, v in (o.partition("=") for o in overrides) if k in ("data", "model", "data.path")}
    title = "fedlora privacy sweep"
    facts = [
        ("data", f"{setting.get('data', 'synthetic')} ({setting.get('data.path', 'embedded')})"),
        ("model", setting.get("model", "minilm")),
        ("fedlora", sweep.get("fedlora", "?")),
        ("started", sweep.get("started", "?")),
        ("command", sweep.get("command", "?")),
    ]
    levels = {c.get("level", "sample") for c in sweep.get("cells", [])} or {"sample"}
    meaning = {
        "sample": "sample-level DP-SGD: epsilon protects each record of a client, per client over the whole run; "
        "'epsilon spent' is the largest epsilon any client reported",
        "user": "user-level DP-FedAvg: epsilon protects all of one client's data over the whole run, noise added "
        "by the server; 'epsilon spent' is the server's accountant's",
    }
    facts.insert(2, ("privacy level", ", ".join(sorted(levels))))
    own = {c["strategy"]: c.get("settings") for c in sweep.get("cells", []) if c.get("settings")}
    if own:  # a preset's per-strategy settings (e.g. Fed-SB's rank), after the shared ones
        facts.append(("per strategy", "; ".join(f"{name}: {' '.join(s)}" for name, s in sorted(own.items()))))
    notes = (
        f"{len(cells)} finished cells. Every cell: the command's settings with the cell's strategy, seed and "
        f"privacy. Private cells use {'; '.join(meaning[lv] for lv in sorted(levels))} (delta as in the run's "
        "config). Upload is all clients' bytes per round, as sent (empty under user-level DP, where it would "
        "tell the cohort's size). Accuracy over seeds is the mean ± the half-width of its 95% t interval (n - 1 "
        "degrees of freedom); with one seed the accuracy is that run's (no interval). The centralised reference "
        "trains plain LoRA on the pooled data, without DP, for as many optimizer steps as a federated run."
    )
    warning = at_chance(cells)
    md = [f"# {title}", ""] + ([f"**{warning}**", ""] if warning else [])
    md += [f"- **{k}**: `{v}`" for k, v in facts] + ["", notes, ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in body]
    write_table_files(folder, header, body)
    versus = comparisons(cells)
    if versus:
        md += ["", "Against FedAvg, final accuracy on paired seeds (an ordering only where the interval excludes 0):"]
        md += [f"- {line}" for line in versus]
    md += [""] + [f"![{name[:-4].replace('_', ' ')}]({name})" for name in PLOTS]
    (folder / "report.md").write_text("\n".join(md) + "\n")

    def embedded(name: str) -> str:
        data = base64.b64encode((folder / name).read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{name[:-4].replace("_", " ")}">'

    facts_html = "".join(f"<li><b>{html.escape(k)}</b>: <code>{html.escape(str(v))}</code></li>" for k, v in facts)
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
{f"<p><b>{html.escape(warning)}</b></p>" if warning else ""}
<ul>{facts_html}</ul>
<p>{html.escape(notes)}</p>
<table><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr></thead>
<tbody>{cells_html}</tbody></table>
{"<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in versus) + "</ul>" if versus else ""}
{"".join(embedded(name) for name in PLOTS)}
</body></html>
"""
    out = folder / "report.html"
    out.write_text(page)
    return out
