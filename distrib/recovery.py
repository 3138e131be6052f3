"""Recovery without rollback: heal a group in place after a lost, stalled or failed rank.

    drop     kill the lost ranks, which makes every survivor's collective fail at once;
             each survivor drops its half-done step and leaves its process group; the
             calls queued behind the failure are consumed (their errors read, not printed)
    replace  a hot spare, else a freshly started actor, takes each lost rank's place (a
             fresh actor starts as soon as its rank is known lost, during the drop); in an
             elastic run (min_workers) one not ready within elastic_wait_s is left out, and
             the survivors take over its logical shards until it joins (group.py)
    state    the survivor furthest on hands its snapshot to the new ranks (and to any
             survivor a step behind) through Ray's object store (made during the replace)
    group    every rank joins a new process group; DDP is rebuilt
The driver then checks every rank's digest and runs the interrupted step again: no
finished step is redone, and the run goes on bit-identical to an uninterrupted one
(under `batchnorm: train`, the BatchNorm running statistics excepted: a new rank takes
its source's, as each rank's own follow its own shards between checks).

When no rank survives, or the heal itself fails, the driver falls back to a restart
from the newest snapshot (recovery_policy.py). RecoveryLog keeps the breakdown of each
recovery and the run's goodput for events.jsonl and the summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from distrib.errors import ReplicaError
from distrib.faults import Fault
from distrib.group import ReplicaGroup
from distrib.protocol import NodeInfo, StepRecord

QUEUED_CALLS_TIMEOUT_S = 5.0
"""How long the survivors have to give up the calls queued behind a failure; a survivor
still busy then is stuck too, and is replaced."""


@dataclass(frozen=True)
class Healed:
    step: int
    """The next step to run: the one the failure interrupted."""
    unreported: dict[int, list[StepRecord]]
    """Steps that every rank finished but whose results never reached the driver (a failed call
    of several steps; a rank killed before its result was sent): step -> the survivors' records."""
    replaced: dict[int, str]
    """Rank -> 'spare' or 'fresh', for each rank replaced."""
    phases_s: dict[str, float]
    """Seconds in each phase: drop, replace, state, group."""
    left_out: list[int]
    """Ranks whose replacement was not ready in time: the group shrank by as many (elastic)."""


def heal(group: ReplicaGroup, err: ReplicaError, *, reported_to: int, faults: list[Fault],
         timeout_s: float) -> Healed:
    """Heal `group` after `err`, the driver having the results of the steps before
    `reported_to` (see the module docstring); raises ReplicaError when it cannot be healed
    (no survivor, a replacement that cannot be placed within `timeout_s`)."""
    clock = _Clock()
    lost = set(err.ranks) if err.lost else set()
    replaced = group.replace(sorted(lost))  # kills them; fresh actors start while the rest goes on
    # The lost ranks' calls fail as Ray learns of their deaths, which takes a while; the group
    # holds their refs and reads them when it stops (so Ray prints nothing), and no one waits.
    group.read_at_stop([ref for rank, ref in err.outstanding if rank in lost])
    refs = [(rank, ref) for rank, ref in err.outstanding if rank not in lost]
    unfinished, dead = group.consume([ref for _, ref in refs], QUEUED_CALLS_TIMEOUT_S)
    more = {rank for rank, ref in refs if ref in unfinished or ref in dead}
    group.read_at_stop(list(unfinished))
    replaced.update(group.replace(sorted(more)))
    lost |= more
    survivors = [rank for rank in range(len(group.replicas)) if rank not in lost]
    if not survivors:
        raise ReplicaError("no replica survived to heal from", ranks=sorted(lost), step=err.step)
    nothing = ray.put((-1, []))  # for the lost ranks: one ref per rank keeps index = rank in the wait
    replies = group.wait([r.status.remote(reported_to) if rank in survivors else nothing
                          for rank, r in enumerate(group.replicas)], "the survivors' status", timeout_s)
    statuses = [replies[rank] for rank in survivors]
    step = max(next_step for next_step, _ in statuses)
    source = next(rank for rank, (next_step, _) in zip(survivors, statuses) if next_step == step)
    needs_state = sorted(lost | {rank for rank, (next_step, _) in zip(survivors, statuses) if next_step < step})
    unreported: dict[int, list[StepRecord]] = {}
    for _, records in statuses:
        for record in records:
            unreported.setdefault(record["step"], []).append(record)
    state = group.replicas[source].snapshot.remote() if needs_state else None  # made while replacements start
    clock.lap("drop")

    left_out = group.wait_replaced()
    moved = lambda rank: rank - sum(gone < rank for gone in left_out)  # noqa: E731
    needs_state = [moved(rank) for rank in needs_state if rank not in left_out]
    if not needs_state:  # the only ranks to fill were left out
        state = None
    clock.lap("replace")
    if state is not None and not group.wait_ready(state, "the state hand-over", timeout_s):
        raise ReplicaError(f"{group.name([source])} did not hand over its state within {timeout_s:g} s",
                           ranks=[source], step=err.step)
    clock.lap("state")
    group.reform(state=state, first_step=step, needs_state=needs_state, faults=faults)
    clock.lap("group")
    return Healed(step=step, unreported={s: r for s, r in unreported.items() if s < step},
                  replaced={rank: how for rank, how in replaced.items() if rank not in left_out},
                  phases_s=clock.laps, left_out=left_out)


def grow(group: ReplicaGroup, *, step: int, faults: list[Fault], check: Callable[[], None]) -> bool:
    """Bring the actors left out of a shrunk group back in at the boundary before `step`: `check`
    first (the consistency check: in the shrunk group it makes the BatchNorm buffers' weighted
    mean every rank's own, and so the snapshot's),
    rank 0's state to the new ranks, the larger group formed, `check` again. Returns whether
    the group grew (an actor that failed to start is started again instead)."""
    check()
    if not group.grow(state=group.replicas[0].snapshot.remote(), first_step=step, faults=faults):
        return False
    check()
    return True


class _Clock:
    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[f"{name}_s"] = now - self._last
        self._last = now


class RecoveryLog:
    """The run's recoveries: whether another may be tried (max_restarts; a deterministic
    failure is not retried), each one's breakdown, written to events.jsonl once the first
    step after it has finished, and the run's goodput: seconds in steps kept over wall seconds."""

    def __init__(self, record_event: Callable[[dict], None], *, max_restarts: int):
        self._record_event = record_event
        self._max_restarts = max_restarts
        self._started_at = time.time()
        self._last_failure: tuple[str, int] | None = None
        self._pending: dict | None = None
        self.count = 0
        """Recoveries begun (heals and restarts)."""
        self.done: list[dict] = []

    def admit(self, err: ReplicaError, *, step: int, nodes: list[NodeInfo], last_progress_at: float | None) -> dict:
        """Count a recovery from `err`, raised while running `step`, and return what events.jsonl
        will say of the failure (the recovery adds its own figures); or raise the ReplicaError
        that ends the run: no restarts left, or the same error raised by a replica at the same
        step as the last one (a lost process or node, a stall, is a fault however often it
        comes). detect_s runs from the last step finished: for a fault as a step starts, its
        detection time."""
        failure = (err.cause, step) if not err.lost else None
        deterministic = failure is not None and failure == self._last_failure
        if self.count >= self._max_restarts or deterministic:
            why = (f"no restarts left: max_restarts={self._max_restarts}" if not deterministic else
                   f"the same failure at step {step} as before: deterministic, not retried")
            raise ReplicaError(f"{err} ({why})", ranks=err.ranks, step=err.step, lost=err.lost,
                               cause=err.cause) from err
        self._last_failure = failure
        self.count += 1
        detected_at = time.time()
        event = {"recovery": self.count, "ranks": err.ranks, "step": step, "cause": str(err),
                 "nodes": sorted({nodes[r].node for r in err.ranks if r < len(nodes)}),
                 "last_progress_at": last_progress_at, "detected_at": detected_at}
        if last_progress_at is not None:
            event["detect_s"] = detected_at - last_progress_at
        return event

    def failed_at(self, step: int) -> None:
        """The last failure was at `step` (a heal found where it broke: a call of several steps
        fails at one of them), so the same error there again is recognised."""
        if self._last_failure is not None:
            self._last_failure = (self._last_failure[0], step)

    def recovered(self, event: dict) -> None:
        """A recovery is done; `event` has its kind, cause, detected_at and phase times."""
        self.flush()
        self._pending = event

    def step_finished(self, finished_at: float) -> bool:
        """A step finished: the first after a recovery completes its event (returns True then)."""
        if self._pending is None:
            return False
        self._pending["first_step_s"] = finished_at - self._pending["detected_at"]
        self.flush()
        return True

    def flush(self) -> None:
        if self._pending is not None:
            self.done.append(self._pending)
            self._record_event(self._pending)
            self._pending = None

    def summary(self, step_seconds: float) -> dict:
        """For summary.json: the recoveries, and goodput given the seconds of the steps kept."""
        self.flush()
        keys = ("event", "ranks", "step", "detect_s", "drop_s", "replace_s", "state_s", "group_s", "check_s",
                "rebuild_s", "first_step_s", "steps_redone")
        wall_s = time.time() - self._started_at
        return {"recoveries": [{k: r[k] for k in keys if k in r} for r in self.done],
                "goodput": step_seconds / wall_s if wall_s > 0 else 0.0}
