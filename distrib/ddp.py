"""DDP around one replica's model: how it is wrapped, and how a DDP built mid-run is brought
to the gradient buckets of one built at step 0 (trainer.py calls both when a rank joins)."""

from __future__ import annotations

import inspect

import torch
from torch.nn.parallel import DistributedDataParallel

from distrib.allreduce import AllReduceHook
from distrib.config import RunConfig


def wrap(model: torch.nn.Module, cfg: RunConfig, device: torch.device,
         comm_hook: AllReduceHook) -> DistributedDataParallel:
    """`model` under DDP in the current process group, with `comm_hook` on a CPU or when it
    compresses. Not collective where DDP takes init_sync=False (no broadcast, no check of the
    ranks' shapes: the digest check after a (re)join proves them alike); collective on a torch
    without it."""
    # No buffer broadcast at each forward: under `train`, each rank keeps its own BatchNorm
    # running stats, reconciled where they are observed (bnstats.py), saving a collective per
    # step; under `sync` and `frozen` they are identical already. Newer torch renamed the switch.
    options = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in options else {
        "broadcast_buffers": False}
    # No broadcast of rank 0's state at set-up either: every rank holds the same state by
    # construction (same seed, same weights, same snapshot), and the driver's digest check
    # right after proves it; the broadcast (90 MB) would only lengthen start-up and heals.
    no_init_sync = {"init_sync": False} if "init_sync" in options else {}
    ddp = DistributedDataParallel(
        model, device_ids=[0] if device.type == "cuda" else None,
        bucket_cap_mb=cfg.bucket_cap_mb, gradient_as_bucket_view=True, **no_buffer_sync, **no_init_sync)
    # Our hook times the all-reduce window (exact with gloo) and can compress; on GPUs
    # without compression DDP keeps its built-in C++ hook, with no Python per bucket.
    if device.type == "cpu" or comm_hook.dtype is not None:
        ddp.register_comm_hook(state=None, hook=comm_hook.hook)
    return ddp


def settle_buckets(trainer) -> None:
    """Bring the Trainer's DDP, built mid-run, to the gradient buckets of one built at step 0.
    Collective.

    DDP's first backward reduces all gradients in one bucket, then it rebuilds its buckets
    in the order gradients became ready. With more than two ranks a bucket's layout decides
    the order in which the ranks' values are summed, and so the rounding: a DDP rebuilt by a
    heal or a restart would round its first step differently from the uninterrupted run.
    One forward and backward of two images on every rank lets it rebuild first; everything
    they change (BatchNorm buffers, gradients) is put back."""
    cfg, device = trainer.cfg, trainer.device
    saved = [buffer.clone() for buffer in trainer.model.buffers()]
    images = torch.zeros(2, 3, cfg.image_size, cfg.image_size, device=device)
    images = images.contiguous(memory_format=trainer.memory_format)
    targets = (torch.zeros(2, cfg.num_classes, device=device) if cfg.loss == "sum" else
               torch.zeros(2, dtype=torch.long, device=device))
    try:  # put back even when a peer is lost mid-backward
        trainer.loss(images, targets).backward()
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.comm_hook.pop_window_s()
        for buffer, value in zip(trainer.model.buffers(), saved):
            buffer.copy_(value)
