"""Build a many-class topic CSV from real text on this machine: which library documents a sentence.

    python experiments/make_topic_csv.py [--out experiments/results/topics.csv] [--per-class 1000]

It stands in for "a user's own CSV" in the convergence checks: 14 classes, each the
docstrings of one installed library (plotting, databases, cryptography, web servers,
deep learning...), split into sentences of 6 to 60 words; no network, no copy of any
data set. The file has ``text,label`` columns; ``fedlora simulate data=files
data.path=<it>`` splits off ``data.test_fraction`` as its test set.
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import random
import re
from pathlib import Path

LIBRARIES = (
    "matplotlib", "sqlalchemy", "cryptography", "aiohttp", "torch", "pyarrow", "rich",
    "networkx", "sympy", "scipy", "pandas", "grpc", "hydra", "email",
)  # fmt: skip
WORDS = re.compile(r"[A-Za-z][A-Za-z'-]+")


def sentences(package: str) -> list[str]:
    """Docstring sentences of ``package``'s modules, de-duplicated, in file order."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return []
    root = Path(spec.origin).parent
    seen, out = set(), []
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                for part in re.split(r"(?<=[.!?])\s+|\n\s*\n", doc):
                    text = " ".join(part.split())
                    words = WORDS.findall(text)
                    if 6 <= len(words) <= 60 and len(words) >= 0.6 * len(text.split()) and text not in seen:
                        seen.add(text)
                        out.append(text)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "topics.csv")
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    for package in LIBRARIES:
        found = sentences(package)
        rng.shuffle(found)
        rows += [(text, package) for text in found[: args.per_class]]
        print(f"{package:<13} {len(found):>6} sentences, {min(len(found), args.per_class)} kept")
    rng.shuffle(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    print(f"{len(rows)} rows, {len({label for _, label in rows})} classes -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
