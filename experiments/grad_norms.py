"""Per-sample gradient norms of what a strategy trains, for choosing DP-SGD's clip norm (privacy.max_grad_norm).

    python experiments/grad_norms.py --examples 256 -- strategy=ffa_lora data=sst2 data.path=../shared/data/sst2

Takes the first examples of client 0's partition (run it on public data, or on your own
before the federation starts: the norms are not released anywhere), computes each
example's gradient of the trainable tensors at the initial state with Opacus's hooks,
and prints the quantiles of their L2 norm. A clip near the median clips about half the
examples: the usual advice (Andrew et al., 2021; De et al., 2022) is a clip at or a
little below the typical norm, so that clipping bounds the sensitivity without
discarding the direction of most gradients.

For classification it also prints, per label, the median norm and how much of that
label's summed gradient each clip keeps (the norm of the clipped sum over the raw one).
On a skewed client with logit adjustment the minority label carries the largest
gradients; a clip that keeps the majority's sum whole and cuts the minority's undoes
the adjustment, and DP runs then drift to the client's majority.
"""

from __future__ import annotations

import argparse

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--partition", type=int, default=0, help="whose examples (a client's partition id)")
    parser.add_argument("--clips", type=float, nargs="+", default=[1.0, 2.0, 5.0], help="clip norms to report")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.examples < 1 or min(args.clips) <= 0:
        parser.error("--examples must be >= 1 and every clip > 0")

    from opacus import GradSampleModule
    from torch.utils.data import DataLoader

    from fedlora import lora
    from fedlora.config.compose import compose
    from fedlora.config.errors import ConfigError
    from fedlora.learning.gradient_init import client_share, initialise
    from fedlora.learning.worker import Worker

    try:
        cfg, _ = compose(args.overrides)
    except ConfigError as err:  # a wrong key or value: one line and status 2, as the CLI answers it
        parser.exit(2, f"error: {err}\n")
    worker = Worker(cfg, num_partitions=cfg.clients).warm_up()
    state = worker.adapted.initial_state()
    if worker.strategy.gradient_init is not None:  # Fed-SB: R sits between LoRA-SB's B and A
        gradients, _ = client_share(worker, 0, num_examples=64)
        state = initialise(worker, state, gradients)
    lora.write(worker.adapted.params, state)
    lora.set_trainable(worker.adapted.params, worker.adapted.protocol.trainable)
    partition = worker.data.tokenised(args.partition)
    data = partition.shuffle(seed=cfg.seed).select(range(min(args.examples, len(partition))))
    tau = cfg.train.logit_adjustment  # the client's loss as it trains: logit-adjusted by its own label mix
    labels = partition["labels"]
    offset = worker.task.label_offset(labels, len(worker.data.splits.label_names), tau=tau) if tau else None
    model = GradSampleModule(worker.adapted.model)
    model.train()
    grads, labels_seen = [], []
    for batch in DataLoader(data, batch_size=32, collate_fn=worker.task.collate(worker.data.tokenizer)):
        model.zero_grad()
        worker.task.loss(model, batch, offset=offset).backward()
        per_sample = [
            worker.adapted.params[k].grad_sample.flatten(1) for k in sorted(worker.adapted.protocol.trainable)
        ]
        grads.append(torch.cat(per_sample, dim=1))  # Opacus undoes the mean reduction itself
        labels_seen.append(batch["labels"])
    model._close()
    grads = torch.cat(grads)
    norms = grads.norm(dim=1)
    quantiles = torch.quantile(norms, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]))
    print(f"strategy={cfg.strategy.name} partition {args.partition}: {len(norms)} examples, per-sample gradient norm")
    print("  q10 {:.3g}  q25 {:.3g}  median {:.3g}  q75 {:.3g}  q90 {:.3g}".format(*quantiles.tolist()))
    for clip in args.clips:
        print(f"  clip {clip:g}: {(norms > clip).float().mean():.0%} of the examples clipped")
    if cfg.task == "classification":
        per_label(grads, norms, torch.cat(labels_seen), args.clips)
    return 0


def per_label(grads: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor, clips: list[float]) -> None:
    """Each label's median norm and the share of its summed gradient that each clip keeps."""
    for label in labels.unique().tolist():
        rows = labels == label
        raw = grads[rows].sum(0).norm()
        kept = []
        for clip in clips:
            scale = (clip / norms[rows].clamp(min=clip)).unsqueeze(1)
            kept.append(f"clip {clip:g} keeps {float((grads[rows] * scale).sum(0).norm() / raw):.0%}")
        print(f"  label {label}: {int(rows.sum())} examples, median {norms[rows].median():.3g}; " + ", ".join(kept))


if __name__ == "__main__":
    raise SystemExit(main())
