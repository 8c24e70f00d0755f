"""The docs' links hold: every relative link in README.md, CHANGELOG.md and docs/ names a file that exists,
and every #anchor a heading of it (GitHub's slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])


def slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert broken == []


def test_the_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 100


def python_blocks() -> list[tuple[str, str, str | None]]:
    """(where, code, why skipped) of every top-level ```python block of the README and docs/ (an indented one is
    a fragment inside a list); ``<!-- doc-test: skip: why -->`` on the line before skips one."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in re.finditer(
            r"(?:<!-- doc-test: skip: (.+?) -->\n)?^```python\n(.*?)^```", page.read_text(), re.M | re.S
        ):
            line = page.read_text()[: m.start(2)].count("\n")
            found.append((f"{page.relative_to(ROOT)}:{line}", m.group(2), m.group(1)))
    return found


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A MiniLM FedAvg export (4 labels, the [CLS] pooler, as the by-hand snippet asks), untrained."""
    from fedlora.config.compose import compose
    from fedlora.learning.worker import Worker
    from fedlora.outputs.export import export_adapter

    cfg, _ = compose(["data.synthetic_train=40", "data.synthetic_test=8", "clients=2", "model.pooling=cls"])
    worker = Worker(cfg, num_partitions=2)
    return export_adapter(worker, worker.adapted.initial_state(), tmp_path_factory.mktemp("export") / "adapter")


@pytest.mark.parametrize("where, code, skipped", python_blocks(), ids=[w for w, _, _ in python_blocks()])
def test_the_docs_python_blocks_run(where: str, code: str, skipped: str | None, exported: Path, tmp_path) -> None:
    """Each block runs as written in a fresh Python, on a real export where it names one."""
    import subprocess
    import sys

    if skipped:
        pytest.skip(skipped)
    script = code.replace("outputs/<date>/<time>/adapter", str(exported))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{where}:\n{script}\n{done.stderr[-3000:]}"
