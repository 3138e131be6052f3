"""Held-out evaluation: loss, top-1 and top-5 counts, the same code on a replica and in `distrib evaluate`.

Counts, not means, leave each process: a replica counts its slice and the driver adds
the slices, so the totals are exact and do not depend on how the set was split.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from distrib.protocol import EvalRecord


def empty() -> EvalRecord:
    return EvalRecord(count=0, loss_sum=0.0, top1=0, top5=0)


def add(a: EvalRecord, b: EvalRecord) -> EvalRecord:
    return EvalRecord(count=a["count"] + b["count"], loss_sum=a["loss_sum"] + b["loss_sum"],
                      top1=a["top1"] + b["top1"], top5=a["top5"] + b["top5"])


def count_batch(logits: torch.Tensor, targets: torch.Tensor) -> EvalRecord:
    """Counts for one batch of (B, classes) logits against class indices."""
    logits = logits.float()
    loss_sum = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    counts = torch.stack([loss_sum, hits[:, 0].sum().double(), hits.any(dim=1).sum().double()]).tolist()
    return EvalRecord(count=len(targets), loss_sum=counts[0], top1=int(counts[1]), top5=int(counts[2]))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             amp_dtype: torch.dtype | None = None,
             memory_format: torch.memory_format = torch.contiguous_format) -> EvalRecord:
    """Counts of `model` (already in eval mode) over every batch."""
    total = empty()
    for images, targets in batches:
        device_type = images.device.type
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images.contiguous(memory_format=memory_format))
        total = add(total, count_batch(logits, targets))
    return total
