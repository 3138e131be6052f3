"""The Ray actor that holds one replica. The driver creates one per worker.

This module imports no torch at its top, so the driver can hold the actor class
without paying torch's import time; the actor imports the trainer (and torch)
as soon as it starts, in parallel with its peers.
"""

from __future__ import annotations

import os
import platform

import ray

from distrib import comm
from distrib.config import RunConfig
from distrib.faults import Fault
from distrib.protocol import EvalRecord, HostState, NodeInfo, Position, StepRecord

CONCURRENCY_GROUPS = {"probe": 1, "snapshot": 1}
"""The hang probe's thread and the snapshot taker's; every other call runs on the one default
thread, in order."""


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu")


class Replica:
    """One replica: a process-group member with its model, optimizer and data shard.

    Calls from the driver run in submission order (a Ray actor runs one call at a
    time), so the driver can queue steps ahead and insert fingerprint calls between them.
    Its life: `prepare` (model and optimizer, no group: a hot spare stops here), then
    `join` a process group as a rank; after a failed step it `join`s a new one.
    """

    def __init__(self):
        import distrib.trainer  # noqa: F401  (start torch's import now, while the driver places peers)

        self._trainer = None

    def node_info(self) -> NodeInfo:
        """Where this replica runs: used to name it in every error."""
        return NodeInfo(node=comm.node_address(), node_id=ray.get_runtime_context().get_node_id(),
                        host=comm.host_name(), pid=os.getpid(),
                        gpus=os.environ.get("CUDA_VISIBLE_DEVICES", ""), device_name=_device_name())

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port for the group's TCP store (asked of rank 0)."""
        return comm.node_address(), comm.free_port()

    def prepare(self, cfg: RunConfig, *, weights) -> None:
        """Build the model (from `weights`, or seeded) and the optimizer; needs no group."""
        from distrib.trainer import Trainer

        self._trainer = Trainer(cfg, weights=weights)

    def join(self, *, world_rank: int, world_size: int, shards: list[int], master_addr: str, master_port: int,
             snapshot: bytes | None, first_step: int, faults: list[Fault] | None) -> None:
        """Leave any group this replica was in and join the one at master_addr:master_port as
        `world_rank`, training on logical `shards` of each global batch, after restoring
        `snapshot` (taken after `first_step` steps) if given; a rank kept from the old group
        keeps its state (`snapshot` None) and its faults (`faults` None). All ranks of the new
        group must be called together."""
        cfg = self._trainer.cfg
        if snapshot is not None:
            self._trainer.restore(snapshot, step=first_step,
                                  world_rank=world_rank if world_size == cfg.num_workers else None)
        comm.leave_process_group()
        comm.init_process_group(backend=cfg.backend, master_addr=master_addr, master_port=master_port,
                                world_rank=world_rank, world_size=world_size, timeout_s=cfg.start_timeout_s)
        self._trainer.join(world_rank=world_rank, shards=shards, faults=faults)

    def status(self, since_step: int) -> tuple[int, list[StepRecord]]:
        """The next step this replica would run, and its records of the steps from `since_step`
        on that it finished (see Trainer.records_since)."""
        return self._trainer.next_step, self._trainer.records_since(since_step)

    def run_steps(self, first_step: int, num_steps: int) -> list[StepRecord]:
        """See Trainer.run_steps. Collective: every rank gets the same call."""
        return self._trainer.run_steps(first_step, num_steps)

    def evaluate(self) -> EvalRecord:
        """See Trainer.evaluate. Collective."""
        return self._trainer.evaluate()

    def fingerprint(self) -> list[tuple[str, int]]:
        """See Trainer.fingerprint. Collective."""
        return self._trainer.fingerprint()

    def state(self) -> dict:
        """See Trainer.state: model and optimizer state on the CPU, for the driver to keep."""
        return self._trainer.state()

    def profile(self, step: int) -> dict:
        """See Trainer.profile. Collective."""
        return self._trainer.profile(step)

    def snapshot(self) -> bytes:
        """See Trainer.snapshot. Call right after fingerprint, which reconciles buffers."""
        return self._trainer.snapshot()

    def begin_snapshot(self) -> None:
        """See Trainer.begin_snapshot: returns once the copy is queued. Call right after fingerprint."""
        self._trainer.begin_snapshot()

    @ray.method(concurrency_group="snapshot")
    def take_snapshot(self, step: int) -> HostState:
        """See Trainer.take_snapshot. Runs on its own thread, so the steps queued after
        begin_snapshot go on while the snapshot is copied and handed over; call it once
        begin_snapshot has returned."""
        return self._trainer.take_snapshot(step)

    def close(self) -> None:
        """Stop the data loader's processes before the actor is killed: a loader killed with
        it prints a traceback that reaches the driver's terminal."""
        if self._trainer is not None:
            for source in self._trainer.data:
                source.close()

    def reset(self) -> None:
        """Close the data loader, leave the process group and drop the model: the actor is then
        as a new one, with its imports done, for the next run of the same shape (warm.py)."""
        import gc

        import torch

        self.close()
        comm.leave_process_group()
        compiled = self._trainer is not None and self._trainer.cfg.compile
        self._trainer = None
        gc.collect()  # the model, its optimizer state and DDP's buckets: ~0.3 GB, freed now
        if compiled:  # dynamo's caches live as long as the process; the next model compiles afresh
            torch._dynamo.reset()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the activations' blocks, held by the caching allocator

    @ray.method(concurrency_group="probe")
    def position(self) -> Position:
        """Where the replica is. Runs on its own thread, so it answers while a step hangs;
        a replica that does not answer is stopped or frozen."""
        return self._trainer.position if self._trainer is not None else Position(-1, "setup")
