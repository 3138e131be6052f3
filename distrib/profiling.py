"""Timing on a replica's device, and the profile of what a step's overlap hides.

On a GPU the marks are CUDA events, read once per call (no host sync per step); on a
CPU they are wall time.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch


class Clock:
    """Marks points in a step; CUDA events on a GPU (no host sync until read), wall time on CPU."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"

    def mark(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self._cuda else end - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wire_gradients(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.Tensor:
    """A flat tensor the size and dtype (None: fp32) of one step's all-reduced gradients
    (meta: no memory)."""
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return torch.empty(numel, dtype=dtype or torch.float32, device="meta")


def measure_overlap(trainer, step: int, repeats: int) -> dict:
    """See Trainer.profile, which calls it inside its process group's guard."""
    wire = wire_gradients(trainer.model, trainer.comm_hook.dtype)
    buffers = [b.clone() for b in trainer.model.buffers()]
    images, targets = trainer.data[0].batch(step)
    images = images.contiguous(memory_format=trainer.memory_format)
    no_sync = trainer.ddp_module.no_sync() if trainer.world_size > 1 else contextlib.nullcontext()
    backward = []
    try:  # put back what it changes even when it fails (a peer lost in batchnorm: sync's collectives)
        with no_sync:
            for _ in range(repeats):
                loss = trainer.loss(images, targets)
                t0 = trainer.clock.mark()
                loss.backward()
                t1 = trainer.clock.mark()
                trainer.optimizer.zero_grad(set_to_none=True)
                synchronize(trainer.device)
                backward.append(trainer.clock.seconds(t0, t1))
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        for buffer, saved in zip(trainer.model.buffers(), buffers):
            buffer.copy_(saved)
    allreduce = []
    if trainer.world_size > 1:
        flat = torch.zeros_like(wire, device=trainer.device)
        for _ in range(repeats):
            torch.distributed.barrier()
            start = time.perf_counter()
            torch.distributed.all_reduce(flat)
            synchronize(trainer.device)
            allreduce.append(time.perf_counter() - start)
    return {"backward_compute_s": statistics.median(backward),
            "allreduce_s": statistics.median(allreduce) if allreduce else 0.0,
            "allreduce_bytes": wire.nbytes if trainer.world_size > 1 else 0}
