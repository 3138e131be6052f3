"""Snapshots of a replica's state that cost its step stream one copy, not a pause.

`begin` only queues a copy of the state into one reusable host buffer (pinned, on a side
stream, on a GPU) and orders the next steps' kernels after it; a thread copies the buffer
out once it has landed, and `take` (called by the driver on another of the actor's threads)
hands that copy over as a `HostState` (protocol.py: no torch needed to unpickle it): the
state's tree and one flat array of bytes. Ray moves such an array as one out-of-band
buffer, and numpy copies it without Python's GIL, so the replica's step thread, which
launches the GPU's kernels, is not held up meanwhile. torch.save, which used to run here,
slowed it for most of ~100 ms a snapshot (a thread of small torch ops beside it ran at
about half speed); `to_bytes` now runs it in the driver (rundir.Snapshot, on its checkpoint
writer). On a CPU the first copy is synchronous. Under fp16 the loss scaler's state_dict,
taken with the snapshot, reads its scale to the host: a synchronisation of the step stream
(not measured on a GPU; bf16, the GPU default, has no scaler).

Snapshots are keyed by the steps done when begun (protocol.SnapshotsBegun).
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable

import torch

from distrib.protocol import HostState, SnapshotsBegun, TensorAt

ALIGN = 64
"""Bytes each tensor's place in the flat buffer is aligned to (any dtype's element size divides it)."""


def layout_of(tensors: list[torch.Tensor]) -> list[TensorAt]:
    """Each tensor's place in one flat buffer, in order, each aligned to ALIGN bytes."""
    places, offset = [], 0
    for tensor in tensors:
        at = TensorAt(offset, tuple(tensor.shape), tuple(tensor.stride()), str(tensor.dtype).removeprefix("torch."),
                      tensor.element_size())
        places.append(at)
        offset += -(-at.nbytes // ALIGN) * ALIGN
    return places


def view(at: TensorAt, flat: torch.Tensor) -> torch.Tensor:
    """The tensor at `at` as a view of `flat`, a uint8 tensor of the whole buffer."""
    part = flat[at.offset:at.offset + at.nbytes]
    return part.view(getattr(torch, at.dtype)).as_strided(at.shape, at.stride)


def to_bytes(state: HostState | bytes) -> bytes:
    """The torch.save bytes of a HostState's tree (each tensor its own storage, as the state's
    were); bytes (a simulated replica's snapshot) as they are."""
    if isinstance(state, bytes):
        return state
    with warnings.catch_warnings():  # Ray hands the array over read-only; it is only read here
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(state.data)
    tree = _map_leaves(state.tree, lambda leaf: view(leaf, flat).clone() if isinstance(leaf, TensorAt) else leaf)
    buffer = io.BytesIO()
    torch.save(tree, buffer)
    return buffer.getvalue()


class HostSnapshots:
    """`begin(state, key)` then `take(key)`: the state as begun, as a HostState."""

    def __init__(self, device: torch.device):
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._flat: torch.Tensor | None = None
        self._layout: list[TensorAt] = []
        self._allocating: threading.Thread | None = None
        # A plain daemon thread per snapshot (they are rare), not an executor: an executor's
        # clean-up runs as Ray's SIGTERM tears the actor down and prints a traceback there.
        self._copying: threading.Thread | None = None  # the last one, taken or not
        self._begun: SnapshotsBegun[tuple[threading.Thread, dict, object]] = SnapshotsBegun()

    def prepare(self, state_of: Callable[[], dict]) -> None:
        """Allocate the host buffer for snapshots of the shapes of `state_of()` on a thread, unless
        there is one: on a GPU, pinning ~90 MB takes tens of milliseconds, which `begin` would
        otherwise spend on the step thread while the GPU's queue of kernels runs dry."""
        if self._stream is None or self._flat is not None or self._allocating is not None:
            return
        tensors = []
        map_tensors(state_of(), tensors.append)
        self._allocating = threading.Thread(target=self._allocate, args=(layout_of(tensors),),
                                            name="snapshot-buffers", daemon=True)
        self._allocating.start()

    def _allocate(self, layout: list[TensorAt]) -> None:
        size = layout[-1].offset + layout[-1].nbytes if layout else 0
        self._flat = torch.empty(size, dtype=torch.uint8, pin_memory=self._stream is not None)
        self._layout = layout

    def begin(self, state: dict, key: int) -> None:
        """Copy `state` (a tree of dicts, lists and tensors, as state_dict() gives) to the host
        buffer and start copying that out, as the snapshot `key`. Kernels queued after this on
        the current stream run after the copy, so the tensors may be changed at once."""
        if self._copying is not None:
            self._copying.join()  # the buffer is about to be overwritten: its last copy must be made
        if self._allocating is not None:
            self._allocating.join()
            self._allocating = None
        tensors: list[torch.Tensor] = []
        map_tensors(state, tensors.append)
        layout = layout_of(tensors)
        if layout != self._layout:
            self._allocate(layout)
        places = iter(layout)
        tree = map_tensors(state, lambda tensor: next(places))
        copied = None
        if self._stream is None:
            for at, tensor in zip(layout, tensors):
                view(at, self._flat).copy_(tensor)
        else:
            current = torch.cuda.current_stream(self._device)
            self._stream.wait_stream(current)  # the state as of the last kernel queued
            with torch.cuda.stream(self._stream):
                for at, tensor in zip(layout, tensors):
                    view(at, self._flat).copy_(tensor, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self._stream)
            current.wait_stream(self._stream)  # the next steps change the tensors after the copy
        result: dict = {}
        thread = threading.Thread(target=_copy_out, args=(self._flat, copied, result), name="snapshot", daemon=True)
        thread.start()
        self._copying = thread
        self._begun.begin(key, (thread, result, tree))

    def take(self, key: int) -> HostState:
        """The snapshot begun as `key` (waits for its copy); older ones not taken are dropped.
        RuntimeError if none was begun as `key`."""
        thread, result, tree = self._begun.take(key)
        thread.join()
        if "error" in result:
            raise result["error"]
        return HostState(tree, result["data"])


def _copy_out(flat: torch.Tensor, copied: torch.cuda.Event | None, result: dict) -> None:
    """A copy of `flat`'s bytes into result["data"] once the copy into it has landed (or result["error"])."""
    try:
        if copied is not None:
            copied.synchronize()
        result["data"] = flat.numpy().copy()  # numpy copies without the GIL
    except Exception as err:  # handed to take(), on the caller's thread
        result["error"] = err


def map_tensors(tree, fn):
    """`tree` (dicts, lists, tuples and leaves, as state_dict() gives) with each tensor t
    replaced by fn(t), visited in a fixed order; other leaves kept."""
    return _map_leaves(tree, lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf)


def _map_leaves(tree, fn):
    if isinstance(tree, dict):
        return {key: _map_leaves(value, fn) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_leaves(value, fn) for value in tree)
    return fn(tree)
