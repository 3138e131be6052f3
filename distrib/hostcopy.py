"""Snapshots of a replica's state that cost its step stream one copy, not a pause.

A snapshot used to copy the state to the host, serialise it and hand ~90 MB to Ray on the
replica's one call thread, while the steps queued behind it (and every peer, at its next
all-reduce) waited. Here `begin` only queues the copy into reusable host buffers (pinned, on
a side stream, on a GPU) and orders the next steps' kernels after it; a thread serialises
the copy once it has landed, and `take` (called by the driver on another of the actor's
threads) waits for the bytes. On a CPU the copy itself is synchronous.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable

import torch


class HostSnapshots:
    """One snapshot at a time: `begin(state)` then `take()` returns its torch.save bytes."""

    def __init__(self, device: torch.device):
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._buffers: list[torch.Tensor] = []
        self._allocating: threading.Thread | None = None
        # A plain daemon thread per snapshot (they are rare), not an executor: an executor's
        # clean-up runs as Ray's SIGTERM tears the actor down and prints a traceback there.
        self._pending: tuple[threading.Thread, dict] | None = None

    def prepare(self, state_of: Callable[[], dict]) -> None:
        """Allocate the host buffers for snapshots of the shapes of `state_of()` on a thread, unless
        there are some: on a GPU, pinning ~90 MB takes tens of milliseconds, which `begin` would
        otherwise spend on the step thread while the GPU's queue of kernels runs dry."""
        if self._stream is None or self._buffers or self._allocating is not None:
            return
        tensors = []
        map_tensors(state_of(), tensors.append)
        specs = [(t.shape, t.stride(), t.dtype) for t in tensors]
        self._allocating = threading.Thread(target=self._allocate, args=(specs,), name="snapshot-buffers",
                                            daemon=True)
        self._allocating.start()

    def _allocate(self, specs: list) -> None:
        self._buffers = [torch.empty_strided(shape, stride, dtype=dtype, pin_memory=self._stream is not None)
                         for shape, stride, dtype in specs]

    def begin(self, state: dict) -> None:
        """Copy `state` (a tree of dicts, lists and tensors, as state_dict() gives) to host
        buffers and start serialising it. Kernels queued after this on the current stream run
        after the copy, so the tensors may be changed at once."""
        if self._pending is not None:
            self._pending[0].join()  # its buffers are about to be overwritten
        if self._allocating is not None:
            self._allocating.join()
        tensors = []
        map_tensors(state, tensors.append)
        if [(t.shape, t.dtype, t.stride()) for t in tensors] != [(b.shape, b.dtype, b.stride()) for b in self._buffers]:
            self._allocate([(t.shape, t.stride(), t.dtype) for t in tensors])
        copied = None
        if self._stream is None:
            for buffer, tensor in zip(self._buffers, tensors):
                buffer.copy_(tensor)
        else:
            current = torch.cuda.current_stream(self._device)
            self._stream.wait_stream(current)  # the state as of the last kernel queued
            with torch.cuda.stream(self._stream):
                for buffer, tensor in zip(self._buffers, tensors):
                    buffer.copy_(tensor, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self._stream)
            current.wait_stream(self._stream)  # the next steps change the tensors after the copy
        buffers = iter(self._buffers)
        host = map_tensors(state, lambda tensor: next(buffers))
        result: dict = {}
        thread = threading.Thread(target=_serialise, args=(host, copied, result), name="snapshot", daemon=True)
        thread.start()
        self._pending = (thread, result)

    def take(self) -> bytes:
        """The bytes of the snapshot begun last (waits for them); RuntimeError if none was begun."""
        if self._pending is None:
            raise RuntimeError("no snapshot was begun: call begin_snapshot before take_snapshot")
        (thread, result), self._pending = self._pending, None
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["bytes"]


def _serialise(host: dict, copied: torch.cuda.Event | None, result: dict) -> None:
    """torch.save bytes of `host` into result["bytes"] once the copy has landed (or result["error"])."""
    try:
        if copied is not None:
            copied.synchronize()
        buffer = io.BytesIO()
        torch.save(host, buffer)
        result["bytes"] = buffer.getvalue()
    except Exception as err:  # handed to take(), on the caller's thread
        result["error"] = err


def map_tensors(tree, fn):
    """`tree` (dicts, lists, tuples and leaves, as state_dict() gives) with each tensor t
    replaced by fn(t), visited in a fixed order; other leaves kept."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {key: map_tensors(value, fn) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(value, fn) for value in tree)
    return tree
