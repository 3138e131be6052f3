"""DDP's communication hook: how each gradient bucket is averaged over ranks, and timed."""

from __future__ import annotations

import time

import torch


class AllReduceHook:
    """DDP's communication hook: averages each gradient bucket over ranks, like DDP's own
    default (divide, then all-reduce a sum), optionally sent in fp16/bf16, and records the
    step's communication window: from the first bucket handed over to the last one done.

    The window is host time: exact with gloo, where the callback runs when the bytes have
    arrived; with NCCL it marks when the work was queued, so sweeps report it on CPU only.
    """

    def __init__(self, *, world_size: int, dtype: torch.dtype | None):
        self.world_size, self.dtype = world_size, dtype
        self._first = self._last = None

    def hook(self, state, bucket):  # no annotations: DDP checks them against its own types
        if self._first is None:
            self._first = time.perf_counter()
        grads = bucket.buffer()
        wire = grads.to(self.dtype) if self.dtype is not None else grads
        wire.div_(self.world_size)
        future = torch.distributed.all_reduce(wire, async_op=True).get_future()

        def done(fut: torch.futures.Future) -> torch.Tensor:
            self._last = time.perf_counter()
            reduced = fut.value()[0]
            if self.dtype is not None:
                grads.copy_(reduced)
                return grads
            return reduced

        return future.then(done)

    def pop_window_s(self) -> float:
        window = (self._last - self._first) if self._first is not None and self._last is not None else 0.0
        self._first = self._last = None
        return window
