"""Train a tiny image encoder on counterfactual pairs: a runnable template for paired objectives.

Each batch holds originals and their counterfactuals together (``counterfactory.loader``).
The label of a pair comes from the data, not from the variant's name: a variant whose answers
equal the original's for every question (the random-mask control) is a positive, one whose
answers changed (evidence removed or blacked out) is a negative. A contrastive loss on cosine
similarity then pulls positives to their original and pushes negatives at least ``margin`` away,
so the encoder must notice exactly the evidence the questions depend on.

    python examples/train_pairs.py --data outputs/demo --steps 50 --image-size 64
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from counterfactory.loader import collate_pairs, describe_version, load, resolve_shards


class TinyEncoder(nn.Module):
    """Three strided convolutions and a projection: small enough to train on a CPU."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def answers_kept(qa: list[dict[str, Any]], variant: str) -> bool:
    """True when every question has the original's answer on this variant."""
    return all(q["answers"].get(variant) == q["answers"]["orig"] for q in qa)


def pair_loss(model: nn.Module, batch: dict[str, Any], margin: float = 0.5) -> tuple[torch.Tensor, int]:
    """Contrastive loss over every (original, present variant) pair of the batch; returns the
    loss and the number of pairs it averaged (missing variants are masked out)."""
    z_orig = model(batch["orig"])
    losses = []
    for name, images in batch["variants"].items():
        present = batch["present"][name]
        if not present.any():
            continue
        sim = (z_orig[present] * model(images[present])).sum(-1)
        kept = torch.tensor([answers_kept(qa, name) for qa, p in zip(batch["qa"], present.tolist(), strict=True) if p])
        losses.append(torch.where(kept, 1.0 - sim, F.relu(sim - margin)))
    if not losses:
        return z_orig.sum() * 0.0, 0
    flat = torch.cat(losses)
    return flat.mean(), flat.numel()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset folder, DATASET@VERSION, or shard URLs")
    p.add_argument("--root", default=None, help="output root for DATASET@VERSION")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--margin", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    # resampled: a fixed number of samples per epoch whatever the shard sizes, so the loop's
    # step count (and, under DDP, every rank's) is known in advance
    shards, folder = resolve_shards(args.data, root=args.root)
    # the first line says which version this trains on (a --limit version says so)
    print(f"training on {describe_version(folder, None, len(shards)).removeprefix('reading ')}", flush=True)
    data = load(args.data, root=args.root, image_size=args.image_size, shuffle=64, seed=args.seed,
                resampled=True, samples_per_epoch=args.steps * args.batch_size, announce=False)
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_pairs)
    model = TinyEncoder()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses: list[float] = []
    pairs = 0
    for batch in loader:
        loss, n = pair_loss(model, batch, args.margin)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        pairs += n
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss became {losses[-1]} at step {len(losses)}")
        print(f"step {len(losses):4d}  loss {losses[-1]:.4f}  pairs {n}")
        if len(losses) >= args.steps:
            break
    return {"losses": losses, "pairs": pairs, "model": model}


if __name__ == "__main__":
    main()
