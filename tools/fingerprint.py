"""Fingerprints of tiny-model runs, to prove a restructuring changed no behaviour.

Runs every case below on the real ServerApp and ClientApps in this process (``tests.local_grid``), then
hashes ``metrics.csv`` (less its wall-time column), the exported adapter's tensors and the checkpoint.
Run it before and after a change and compare the two JSON files::

    python tools/fingerprint.py /tmp/before            # on the old commit (a git worktree)
    python tools/fingerprint.py /tmp/after             # on the new one
    python tools/fingerprint.py --compare /tmp/before /tmp/after

The DP cases use ``privacy.unsafe_seeded_randomness=true`` so that their noise repeats (never in a real run).
About 1 minute on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from pathlib import Path

BASE = [
    "model=tiny", "data.synthetic_train=300", "data.synthetic_test=64", "clients=5", "clients_per_round=3",
    "rounds=2", "train.local_steps=2", "train.batch_size=8",
]  # fmt: skip
LLM = [
    "model=tiny_llama", "data.synthetic_train=40", "data.synthetic_test=8", "train.max_seq_len=96",
    "train.batch_size=4", "train.local_steps=1", "train.eval_batch_size=16",
]  # fmt: skip
SEEDED_DP = ["privacy.epsilon=8", "privacy.unsafe_seeded_randomness=true"]
CASES: dict[str, list[str]] = {
    **{
        name: [f"strategy={name}"] for name in ("fedavg", "ffa_lora", "fedsvd", "fed_sb", "flora", "lora_fair", "fedex")
    },
    "fedavg_adam": ["strategy=fedavg", "server.optimizer=adam"],
    "fedavg_trimmed": ["strategy=fedavg", "server.aggregation=trimmed_mean"],
    "flora_het": ["strategy=flora", "strategy.client_ranks=[2,4,8]"],
    "fedavg_dirichlet": ["strategy=fedavg", "partition=dirichlet", "train.lr_schedule=cosine"],
    "dp_ffa_lora": ["strategy=ffa_lora", "privacy=dp", *SEEDED_DP],
    "dp_fed_sb": ["strategy=fed_sb", "privacy=dp", *SEEDED_DP],
    "user_fedavg": ["strategy=fedavg", "privacy=user", *SEEDED_DP],
    "llm_fedavg": ["strategy=fedavg", *LLM],
    "llm_fed_sb": ["strategy=fed_sb", *LLM],
}
COMPARED = ("metrics", "adapter", "checkpoint")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def tensors_digest(path: Path) -> str:
    """The file's tensors, by name, as raw bytes: any change of a bit shows."""
    import torch
    from safetensors.torch import load_file

    tensors = sorted(load_file(str(path)).items())
    return digest(
        b"".join(name.encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for name, t in tensors)
    )


def fingerprint(out: Path) -> dict[str, str]:
    with (out / "metrics.csv").open() as f:
        rows = [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(f)]
    adapter = {p.name: tensors_digest(p) for p in sorted((out / "adapter").rglob("*.safetensors"))}
    checkpoint = out / "checkpoint.safetensors"
    return {
        "metrics": digest(json.dumps(rows, sort_keys=True).encode()),
        "adapter": digest(json.dumps(adapter, sort_keys=True).encode()),
        "checkpoint": tensors_digest(checkpoint) if checkpoint.is_file() else "",
    }


def run(root: Path, names: list[str]) -> dict[str, object]:
    sys.path.insert(0, os.getcwd())  # the checkout being fingerprinted, not an installed copy
    try:
        from fedlora.config.compose import compose
    except ImportError:  # before fedlora/ had folders
        from fedlora.compose import compose  # type: ignore[no-redef]
    from tests.local_grid import run_in_process

    result: dict[str, object] = {}
    for name in names:
        out = root / name
        try:
            run_in_process(compose([*BASE, *CASES[name], f"output_dir={out}"])[0])
            result[name] = fingerprint(out)
        except Exception as err:
            result[name] = f"error: {type(err).__name__}: {err}"
        print(name, result[name], flush=True)
    (root / "fingerprint.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def compare(before: Path, after: Path) -> int:
    a = json.loads((before / "fingerprint.json").read_text())
    b = json.loads((after / "fingerprint.json").read_text())
    differ = 0
    for name in sorted(a):
        same = isinstance(a[name], dict) and isinstance(b.get(name), dict)
        same = same and all(a[name][k] == b[name][k] for k in COMPARED)
        differ += not same
        print(f"{name:18s} {'same' if same else 'DIFFERENT'}")
    print(f"{len(a) - differ} of {len(a)} runs bit-identical")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="output folder; with --compare: before after")
    parser.add_argument("--compare", action="store_true", help="compare two earlier fingerprints")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.folders)
    args.folders[0].mkdir(parents=True, exist_ok=True)
    run(args.folders[0], args.cases)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
