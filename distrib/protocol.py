"""What crosses between the driver and the replicas, defined once for both sides.

Pure Python (no torch, no ray): the driver imports it without paying for torch,
and the replica fills in exactly these shapes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypedDict, TypeVar

PHASES = ("data_s", "forward_s", "backward_s", "optimizer_s")
"""Timed phases of a replica's step, in seconds, in order; backward_s includes DDP's
all-reduce, which overlaps it."""


class StepRecord(TypedDict):
    """One rank's account of one step, as `run_steps` returns it (a plain dict on the wire)."""

    step: int
    loss: float
    """This rank's loss on its shard: mean for cross_entropy, sum for the sum loss."""
    data_s: float
    forward_s: float
    backward_s: float
    optimizer_s: float
    comm_s: float
    """All-reduce window: first gradient bucket sent to last one received (0 alone)."""


class EvalRecord(TypedDict):
    """One rank's counts over its slice of the held-out set; the driver sums them over ranks,
    so the totals are the same for any number of workers."""

    count: int
    loss_sum: float
    """Sum of the per-image cross-entropy (float64 on the replica)."""
    top1: int
    """Images whose target is the top-scored class."""
    top5: int
    """Images whose target is among the 5 top-scored classes (all of them, with fewer than 5)."""


Phase = Literal["setup", "broken", "idle", "data", "forward", "backward", "optimizer", "done", "eval"]
"""Where a replica is, as its hang probe reports it (`broken`: it left its process group after a
failed step and waits to join a new one)."""

PHASE_ORDER: tuple[Phase, ...] = ("setup", "broken", "idle", "data", "forward", "backward", "optimizer", "done",
                                  "eval")
"""Phases in the order a replica passes them within a step: a rank earlier in this order
at the same step is behind its peers."""


@dataclass(frozen=True)
class Position:
    """The step a replica is in and its phase there (step -1 before the first one)."""

    step: int
    phase: Phase

    def progress(self) -> tuple[int, int]:
        """Sortable: a smaller value is further behind."""
        return self.step, PHASE_ORDER.index(self.phase)


@dataclass(frozen=True)
class NodeInfo:
    """Where one replica runs; every error about a rank names its node and pid from this."""

    node: str
    """The node's IP address as Ray sees it."""
    node_id: str
    host: str
    pid: int
    gpus: str
    """CUDA_VISIBLE_DEVICES of the replica's process ('' on CPU)."""
    device_name: str


Fingerprint = list[tuple[str, int]]
"""(name, checksum of the raw bits) of every parameter, momentum buffer and module buffer."""


def first_difference(prints: list[Fingerprint]) -> tuple[int, str] | None:
    """(rank, what differs) for the first rank whose fingerprint (prints[rank]) is not rank 0's."""
    for rank, theirs in enumerate(prints[1:], start=1):
        for (name, ours_sum), (their_name, their_sum) in zip(prints[0], theirs):
            if name != their_name or ours_sum != their_sum:
                return rank, f"differs from rank 0, first in {name}"
        if len(theirs) != len(prints[0]):
            return rank, f"holds {len(theirs)} state tensors, rank 0 holds {len(prints[0])}"
    return None


def shards_of(num_shards: int, world_size: int) -> list[list[int]]:
    """The logical shards of each global batch that each of `world_size` ranks trains on: shard
    s goes to rank s mod world_size, so at full size rank r has shard r."""
    return [list(range(rank, num_shards, world_size)) for rank in range(world_size)]


@dataclass(frozen=True)
class TensorAt:
    """Where a tensor lies in a HostState's bytes: its offset, shape and strides (in elements),
    and its dtype by name ("float32", "bfloat16", ...: no torch needed to unpickle it)."""

    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    itemsize: int

    @property
    def nbytes(self) -> int:
        """The bytes its strided elements span (numel x element size for a dense tensor)."""
        if 0 in self.shape:
            return 0
        return (1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride))) * self.itemsize


@dataclass(frozen=True)
class HostState:
    """A replica's state tree (dicts, lists, tensors and other leaves, as state_dict() gives)
    as the tree with each tensor replaced by its TensorAt, and `data`, a flat uint8 numpy array
    of all the tensors' bytes (hostcopy.py makes one, and turns it into torch.save bytes)."""

    tree: object
    data: Any


Taken = TypeVar("Taken")


class SnapshotsBegun(Generic[Taken]):
    """A replica's snapshots begun and not yet taken, by the steps done when begun: the driver
    can queue the next checkpoint's begin before it takes the previous one's, when checkpoints
    come more often than the steps it keeps queued. Begun on the replica's call thread, taken on
    its snapshot thread, hence the lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._begun: dict[int, Taken] = {}

    def begin(self, step: int, snapshot: Taken) -> None:
        """Keep `snapshot` as begun after `step` steps; any begun at `step` or later (before a
        rewind) are dropped."""
        with self._lock:
            self._begun = {k: v for k, v in self._begun.items() if k < step}
            self._begun[step] = snapshot

    def take(self, step: int) -> Taken:
        """The snapshot begun after `step` steps; those begun before it and not taken are dropped.
        RuntimeError if none was."""
        with self._lock:
            if step not in self._begun:
                raise RuntimeError(f"no snapshot was begun after step {step}: "
                                   "call begin_snapshot before take_snapshot")
            snapshot = self._begun.pop(step)
            self._begun = {k: v for k, v in self._begun.items() if k > step}
        return snapshot
