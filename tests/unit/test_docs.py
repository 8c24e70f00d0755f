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


RUNNER = """
import json, sys, traceback
failed = {}
for where, code in json.loads(sys.argv[1]):
    try:
        exec(compile(code, where, "exec"), {"__name__": "__main__"})
    except BaseException:
        failed[where] = traceback.format_exc()
print(json.dumps(failed))
"""


@pytest.fixture(scope="module")
def failures(exported: Path, tmp_path_factory) -> dict[str, str]:
    """Every runnable block, each in its own namespace, in one fresh Python (one import of torch and
    transformers for all), on the export where a block names one: where -> traceback of those that fail."""
    import json
    import subprocess
    import sys

    blocks = [
        (w, c.replace("outputs/<date>/<time>/adapter", str(exported))) for w, c, skip in python_blocks() if not skip
    ]
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(blocks)], cwd=tmp_path_factory.mktemp("docs"),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where, code, skipped", python_blocks(), ids=[w for w, _, _ in python_blocks()])
def test_the_docs_python_blocks_run(where: str, code: str, skipped: str | None, failures: dict[str, str]) -> None:
    """Each block runs as written, on a real export where it names one."""
    if skipped:
        pytest.skip(skipped)
    assert where not in failures, f"{where}:\n{code}\n{failures.get(where, '')[-3000:]}"
