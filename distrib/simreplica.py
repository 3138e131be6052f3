"""SimReplica: a replica that is, towards the driver, a Replica, but whose step is a sleep.

It answers every call the driver makes, in the same shapes (step records, fingerprints,
snapshots, positions, node info) and on the same actor threads, so the driver's own code
(driver.py, group.py, recovery.py, blame.py, stall.py), not a copy, runs against it:

    distrib simulate --workers 128 --step-ms 7           # the driver's cost per step at 128 replicas
    RunConfig(simulate_step_ms=7, cpus_per_worker=0.01)  # what group.py's _new_actor looks for

What it does: each step sleeps `simulate_step_ms`, split over the four phases of a real
step (REAL_PHASE_SHARES); it carries a small state that every step changes, so its
fingerprints and snapshots say which steps a replica ran; its snapshots are
SIM_SNAPSHOT_BYTES long; faults fire as in the real trainer (a kill is a real SIGKILL, so
the driver's real recovery heals it).

What it does not do: no torch (never imported, so a hundred of them fit on a laptop), no
model, no data, and no process group: simulated replicas do not all-reduce. A step stays
collective in one respect: when a peer's kill or error fault fires at a step, every rank
fails that step, as its all-reduce would, with the words gloo uses (so blame.py tells the
cause from the peers it broke). A stalled peer is not waited for: its peers run on, and
the stall watch names it all the same.
"""

from __future__ import annotations

import os
import struct
import time
import zlib

import ray

from distrib import cadence, comm
from distrib.config import RunConfig
from distrib.faults import Fault, fire
from distrib.protocol import PHASES, EvalRecord, Fingerprint, NodeInfo, Position, SnapshotsBegun, StepRecord
from distrib.replica import CONCURRENCY_GROUPS  # noqa: F401  (the threads group.py gives both kinds)

SIM_SNAPSHOT_BYTES = 1 << 20
"""Length of a simulated snapshot (1 MiB): enough to cost the object store something on a heal
or a checkpoint, small enough that a hundred replicas' hand-overs fit in a laptop's memory.
A real resnet18 snapshot is ~90 MB."""

REAL_PHASE_SHARES = (("data", 0.1), ("forward", 0.3), ("backward", 0.5), ("optimizer", 0.1))
"""How a simulated step's sleep is split over the phases (roughly a resnet18 step on a GPU)."""

SIM_STATE_NAMES = ([f"param:{i}" for i in range(62)] + [f"momentum:{i}" for i in range(62)]
                   + [f"buffer:{i}" for i in range(60)])
"""One fingerprint entry per state tensor of resnet18 (62 parameters, their momentum buffers, 60
BatchNorm buffers), so the driver compares as many entries as with real replicas."""

_SNAPSHOT_MAGIC = b"distrib-sim-snapshot\n"
_SNAPSHOT_HEADER = struct.Struct("<qI")
"""The step after which it was taken, and the simulated state."""


class SimReplica:
    """A Replica's public methods: same names, arguments, results and threads (the same
    concurrency groups); calls on the default thread run in submission order. `timeline` is
    the one method more: when each call of steps and each check began and returned."""

    def __init__(self):
        self.cfg: RunConfig | None = None
        self.world_rank, self.world_size = -1, 1
        self.shards: list[int] = []
        self.next_step = 0
        self._state = 0
        """The simulated model: a checksum into which every step folds its number."""
        self.broken: str | None = None
        """Why this rank failed a step; it refuses steps and checks until it joins a group again."""
        self._position = Position(-1, "setup")
        """Where this replica is; read by the driver's probes from another thread."""
        self._faults: list[Fault] = []
        """The run's faults, every rank's: its own fire here; a peer's kill or error fails its step here."""
        self._recent: dict[int, StepRecord] = {}
        self._snapshots: SnapshotsBegun[bytes] = SnapshotsBegun()
        self._timeline: list[tuple[str, int, float, float]] = []

    # ---- set-up --------------------------------------------------------------------------------
    def node_info(self) -> NodeInfo:
        """Where this replica runs."""
        return NodeInfo(node=comm.node_address(), node_id=ray.get_runtime_context().get_node_id(),
                        host=comm.host_name(), pid=os.getpid(), gpus="", device_name="simulated")

    def rendezvous_address(self) -> tuple[str, int]:
        """What a real rank 0 answers; nothing listens there."""
        return comm.node_address(), comm.free_port()

    def prepare(self, cfg: RunConfig, *, weights) -> None:
        """Take the config; the state starts from the seed, the same on every replica (`weights` unused)."""
        self.cfg = cfg
        self._state = zlib.crc32(f"seed {cfg.seed}".encode())
        self._position = Position(-1, "idle")

    def join(self, *, world_rank: int, world_size: int, shards: list[int], master_addr: str, master_port: int,
             snapshot: bytes | None, first_step: int, faults: list[Fault] | None) -> None:
        """Become `world_rank` of `world_size`, stepping for `shards` (each a step's sleep), after
        restoring `snapshot` (taken after `first_step` steps) if given; `faults` None keeps this
        rank's. No process group is formed (the address is unused): simulated replicas do not
        all-reduce."""
        if snapshot is not None:
            self._restore(snapshot, step=first_step)
        self.world_rank, self.world_size, self.shards = world_rank, world_size, list(shards)
        if faults is not None:
            self._faults = list(faults)
        self.broken = None
        self._position = Position(self.next_step - 1, "idle")

    # ---- steps -----------------------------------------------------------------------------------
    def status(self, since_step: int) -> tuple[int, list[StepRecord]]:
        """The next step this replica would run, and its records of the finished steps from `since_step` on."""
        return self.next_step, [self._recent[s] for s in sorted(self._recent) if s >= since_step]

    def run_steps(self, first_step: int, num_steps: int) -> list[StepRecord]:
        """Sleep through steps first_step .. first_step + num_steps - 1; one record per step. A failed
        step (a fault here or at a peer) is dropped, the steps before it kept for `status`."""
        began = time.time()
        self._refuse_if_broken()
        if first_step != self.next_step:
            raise RuntimeError(f"asked for step {first_step}, but the next step here is {self.next_step}")
        records = []
        # Sleep to deadlines carried from phase to phase and step to step, so the sleeps'
        # overshoot does not add up over a call: its steps last num_steps x simulate_step_ms.
        marks = [time.perf_counter()]
        deadline = marks[0]
        try:
            for step in range(first_step, first_step + num_steps):
                deadline = self._step(step, deadline, marks)
                phases = [end - start for start, end in zip(marks[-5:], marks[-4:])]
                records.append(StepRecord(step=step, loss=_loss(step), **dict(zip(PHASES, phases)), comm_s=0.0))
                self._state = zlib.crc32(struct.pack("<q", step), self._state)
                self.next_step = step + 1
        except Exception as err:
            self.broken = f"{type(err).__name__} at step {self.next_step}"
            self._position = Position(self.next_step - 1, "broken")
            raise
        finally:
            self._keep(records)
        self._position = Position(self.next_step - 1, "done")
        self._timeline.append(("run_steps", first_step, began, time.time()))
        return records

    def _step(self, step: int, deadline: float, marks: list[float]) -> float:
        """One step's sleep, from `deadline` (when the previous one was due to end); appends the end
        of each phase to `marks` and returns when this step was due to end."""
        self._position = Position(step, "data")
        for fault in [f for f in self._faults if f.step == step and f.rank == self.world_rank and f.kind != "slow"]:
            if fault.kind != "error":  # an error fault stands for a deterministic failure: it stays
                self._faults.remove(fault)
            fire(fault)
        step_s = self.cfg.simulate_step_ms / 1e3 * max(1, len(self.shards))  # a shrunk group's ranks do more
        for phase, share in REAL_PHASE_SHARES:
            self._position = Position(step, phase)
            if phase == "data":  # a slow fault lengthens loading, as a slow disk would
                slowed = time.perf_counter()
                for fault in [f for f in self._faults
                              if f.kind == "slow" and f.rank == self.world_rank and f.step <= step]:
                    fire(fault)
                deadline += time.perf_counter() - slowed
            elif phase == "backward":
                self._fail_with_peers(step)
            deadline += share * step_s
            time.sleep(max(0.0, deadline - time.perf_counter()))
            marks.append(time.perf_counter())
        return deadline

    def _fail_with_peers(self, step: int) -> None:
        """Raise, in the backward phase of `step`, what a rank's all-reduce raises when a peer's kill
        or error fault fires at that step; a peer's kill fires once, its error every time."""
        peers = [f for f in self._faults
                 if f.step == step and f.rank != self.world_rank and f.kind in ("kill", "error")]
        for fault in peers:
            if fault.kind == "kill":
                self._faults.remove(fault)
        if peers:
            raise RuntimeError(f"simulated all-reduce of step {step}: Connection closed by peer "
                               f"(rank {peers[0].rank}, {peers[0].kind} fault)")

    def _keep(self, records: list[StepRecord]) -> None:
        """Keep the latest records, more than the driver can have queued, for `status` after a failure."""
        self._recent.update((r["step"], r) for r in records)
        kept = cadence.records_kept(self.cfg)
        self._recent = {s: r for s, r in self._recent.items() if s >= self.next_step - kept}

    def _refuse_if_broken(self) -> None:
        if self.broken is not None:  # the real trainer's words: blame.py reads them as a peer's failure
            raise RuntimeError(f"rank {self.world_rank} left its process group ({self.broken}); "
                               "it waits to join a new one")

    # ---- checks, state, snapshots ------------------------------------------------------------
    def evaluate(self) -> EvalRecord:
        """This rank's counts over its slice of eval_size images, after sleeping one step's time."""
        began = time.time()
        self._refuse_if_broken()
        self._position = Position(self.next_step - 1, "eval")
        time.sleep(self.cfg.simulate_step_ms / 1e3)
        count = len(range(self.world_rank, self.cfg.eval_size, self.world_size))
        self._position = Position(self.next_step - 1, "done")
        self._timeline.append(("evaluate", self.next_step, began, time.time()))
        return EvalRecord(count=count, loss_sum=count * _loss(self.next_step), top1=count // 2, top5=count * 4 // 5)

    def fingerprint(self) -> Fingerprint:
        """One (name, checksum) per resnet18 state tensor, from the simulated state: the same on every
        rank that ran the same steps from the same start, different after any other step."""
        began = time.time()
        self._refuse_if_broken()
        prints = [(name, zlib.crc32(name.encode(), self._state)) for name in SIM_STATE_NAMES]
        self._timeline.append(("fingerprint", self.next_step, began, time.time()))
        return prints

    def state(self) -> dict:
        """The simulated state: the steps done and the checksum they made (a real replica's holds tensors)."""
        return {"step": self.next_step, "state": self._state}

    def profile(self, step: int) -> dict:
        """Only scaling sweeps (distrib scale) profile, and what they measure is the all-reduce's overlap."""
        raise NotImplementedError("simulated replicas do not all-reduce, so there is nothing to profile; "
                                  "run scaling sweeps (distrib scale) with real replicas (simulate_step_ms: 0)")

    def snapshot(self) -> bytes:
        """SIM_SNAPSHOT_BYTES holding the steps done and the state; `join` restores them."""
        header = _SNAPSHOT_MAGIC + _SNAPSHOT_HEADER.pack(self.next_step, self._state)
        return header + bytes(SIM_SNAPSHOT_BYTES - len(header))

    def begin_snapshot(self) -> None:
        """A snapshot as of now, between the steps queued before and after it; take_snapshot gives it."""
        self._snapshots.begin(self.next_step, self.snapshot())

    @ray.method(concurrency_group="snapshot")
    def take_snapshot(self, step: int) -> bytes:
        """The snapshot begun after `step` steps; older ones not taken are dropped. On its own
        thread, like the real one."""
        return self._snapshots.take(step)

    def _restore(self, payload: bytes, *, step: int) -> None:
        taken_at = snapshot_step(payload)
        _, self._state = _SNAPSHOT_HEADER.unpack_from(payload, len(_SNAPSHOT_MAGIC))
        if taken_at != step:  # the driver handed over the wrong state: say so rather than run on
            raise ValueError(f"the snapshot was taken after {taken_at} steps, not {step}")
        self.next_step = step

    def close(self) -> None:
        """Nothing to close: no data loader."""

    @ray.method(concurrency_group="probe")
    def position(self) -> Position:
        """Where the replica is. Runs on its own thread, so it answers while a step sleeps or stalls."""
        return self._position

    def timeline(self) -> list[tuple[str, int, float, float]]:
        """(method, first step or steps done, time.time() it began, time.time() it returned) of every
        call of steps, check and evaluation so far: `distrib simulate` reads the driver's latency from it."""
        return list(self._timeline)


def _loss(step: int) -> float:
    """A loss that falls with the step, the same on every rank."""
    return 2.0 / (1.0 + 0.01 * step)


def snapshot_step(payload: bytes) -> int:
    """The steps done when a simulated replica's snapshot was taken."""
    if not payload.startswith(_SNAPSHOT_MAGIC):
        raise ValueError("not a simulated replica's snapshot (a real run's checkpoint?)")
    return _SNAPSHOT_HEADER.unpack_from(payload, len(_SNAPSHOT_MAGIC))[0]
