"""The driver's recovery policy: after a failure, heal the group in place or restart it from
the newest snapshot (or give up), and what either does to the run's own state: the step
counter, the metrics kept, the run directory, the checks and checkpoints due. The heal's
mechanics are in recovery.py, the group's in group.py.

A mixin of the Orchestrator (driver.py), kept apart from its lockstep loop: it works on
the attributes and methods declared below, which the Orchestrator defines.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from distrib import cadence, faults, recovery
from distrib.config import RunConfig
from distrib.errors import DivergenceError, ReplicaError
from distrib.group import ReplicaGroup
from distrib.hang import HangLimit
from distrib.metrics import EvalMetrics, StepMetrics
from distrib.protocol import PHASES
from distrib.rundir import RunDir
from distrib.watchers import Watchers


class RecoveryPolicy:
    """_recover(err) is the entry point: the lockstep loop calls it with the failure it caught."""

    cfg: RunConfig
    step_count: int
    history: list[StepMetrics]
    evals: list[EvalMetrics]
    rundir: RunDir
    restarts: int
    _group: ReplicaGroup
    _recoveries: recovery.RecoveryLog
    _faults: list[faults.Fault]
    _formed_at_step: int
    _say: Callable[[str], None]
    _record_step: Callable[..., StepMetrics]
    check_consistency: Callable[[], None]
    evaluate: Callable[[], EvalMetrics]
    _checkpoint_now: Callable[..., None]
    _start_group: Callable[[], None]
    _hang_limit: HangLimit
    _watchers: Watchers

    def _leave_draining_nodes(self) -> None:
        """Snapshot at the step boundary reached, then move the group off the nodes Ray is
        draining (a preemption notice) before they go: a restart from that snapshot, so no
        step is redone."""
        self._checkpoint_now(wait_for_disk=False)
        self._recover(self._group.drain_error(step=self.step_count - 1), rebuild=True)

    def _recover(self, err: ReplicaError, *, rebuild: bool = False) -> None:
        """Heal the group, or (`rebuild`, recovery: restart, or no heal possible) replace it and
        go back to the newest snapshot; or give up: out of restarts, or a deterministic failure.
        A recovery that fails in turn (a replica lost while the new group starts) is a failure
        like any other: a restart follows, while restarts are left. A stop asked for
        meanwhile ends the recovery: the run stops with what is on disk."""
        while True:
            try:
                event = self._recoveries.admit(err, step=self.step_count, nodes=self._group.nodes,
                                               last_progress_at=self.history[-1].finished_at if self.history else None)
            except ReplicaError:
                self._group.consume([ref for _, ref in err.outstanding], recovery.QUEUED_CALLS_TIMEOUT_S)
                raise
            self._faults = faults.unspent(self._faults, handed_out=err.step)
            try:
                return self._heal_or_restart(err, event, rebuild=rebuild)
            except ReplicaError as again:
                if self.stopped_by is not None:
                    raise
                self._say(f"recovery failed: {again}")
                # Counted against max_restarts, so recorded too: one event per recovery admitted.
                self._recoveries.recovered({**event, "event": "failed", "error": str(again)})
                self._recoveries.flush()
                err, rebuild = again, True  # a group half re-formed has no survivors to heal from

    def _heal_or_restart(self, err: ReplicaError, event: dict, *, rebuild: bool) -> None:
        cfg = self.cfg
        # NCCL reports a broken collective asynchronously, after later kernels (the optimizer's)
        # were queued: a survivor's state is then not known to be at a step boundary.
        if cfg.recovery == "heal" and cfg.backend == "gloo" and not rebuild:
            self._say(f"recovery {self.restarts}/{cfg.max_restarts}: {err}; healing at step {self.step_count}")
            try:
                return self._heal(err, event)
            except (ReplicaError, DivergenceError) as heal_err:
                if self.stopped_by is not None:  # no restart (seconds of placement) inside a stop's grace
                    raise
                self._say(f"heal failed: {heal_err}; restarting the group")
        self._restart(err, event)

    def _heal(self, err: ReplicaError, event: dict) -> None:
        world_size = self._group.world_size
        healed = recovery.heal(self._group, err, reported_to=self.step_count, faults=self._faults,
                               timeout_s=self.cfg.start_timeout_s)
        self._recoveries.failed_at(healed.step)
        for step in range(self.step_count, healed.step):  # finished by all before the failure, never reported
            records = healed.unreported[step]  # the survivors' only: the metrics say `partial`
            self._record_step(step, records, wall_s=max(sum(r[p] for p in PHASES) for r in records),
                              partial=len(records) < world_size)
        self.step_count = healed.step
        self._group_formed()
        started = time.monotonic()
        self.check_consistency()
        check_s = time.monotonic() - started
        self._boundary_after_recovery()
        event["ranks"] = sorted(set(err.ranks) | set(healed.replaced) | set(healed.left_out))  # all lost
        if healed.left_out:
            self._resized(world_size, "shrink", because=f"no replacement within {self.cfg.elastic_wait_s:g} s")
        self._recoveries.recovered({
            "event": "heal", **event, "replaced": {str(r): how for r, how in healed.replaced.items()},
            **healed.phases_s, "check_s": check_s, "healed_at": time.time(), "steps_redone": 0})

    def _grow(self) -> None:
        world_size = self._group.world_size
        if recovery.grow(self._group, step=self.step_count, faults=self._faults, check=self.check_consistency):
            self._group_formed()
            self._resized(world_size, "grow", because="the left-out replacements started")

    def _group_formed(self) -> None:
        """The group was (re)formed at step_count: no stall watch on its first call, the hang
        limit's grace for its first calls again, the straggler window anew."""
        self._formed_at_step = self.step_count
        self._hang_limit.formed()
        self._watchers.formed(whole=self._group.world_size == self.cfg.num_workers)

    def _resized(self, world_size: int, kind: str, *, because: str) -> None:
        """Say and record (events.jsonl) a change of the group's size from `world_size`."""
        event = {"event": kind, "step": self.step_count, "from": world_size, "to": self._group.world_size}
        self._say(f"group {kind}s from {world_size} to {event['to']} of {self.cfg.num_workers} ranks at step "
                  f"{self.step_count}: {because}")
        self.rundir.record_event(event)

    def _boundary_after_recovery(self) -> None:
        """The checkpoint and evaluation due at the step the group goes on from, which the calls
        dropped with a failure (or a crash before a resume) may never have run: the checkpoint
        unless the snapshot is at this step, the evaluation unless its record is in the run's
        metrics (it ran before the failure, in this process or the one resumed from). Nothing at
        step 0. The group's own start-up or heal check stands for a check."""
        if self.step_count == 0:
            return
        for kind in cadence.boundary_calls(self.cfg, self.step_count):
            if kind == "checkpoint":
                self._checkpoint_now(wait_for_disk=False)
            elif kind == "eval" and self.step_count - 1 not in self.rundir.evaluated_steps:
                self.evaluate()

    def _restart(self, err: ReplicaError, event: dict) -> None:
        """Replace the whole group and go back to the newest snapshot (or step 0)."""
        restore_step = self.rundir.snapshot.step if self.rundir.snapshot else 0
        self._say(f"restart {self.restarts}/{self.cfg.max_restarts}: {err}; going back to step {restore_step}")
        started = time.monotonic()
        self._group.stop()
        self._group.consume([ref for _, ref in err.outstanding], recovery.QUEUED_CALLS_TIMEOUT_S)
        # In the event before the group starts: a restart that fails there is recorded as
        # "failed" from it, and the steps it rewound are redone all the same.
        event.update(restored_step=restore_step, steps_redone=self.step_count - restore_step)
        self.step_count = restore_step
        self.history = [m for m in self.history if m.step < restore_step]
        self.evals = [m for m in self.evals if m.step < restore_step]
        self.rundir.rewind(restore_step)
        self._start_group()
        self._boundary_after_recovery()
        self._recoveries.recovered({
            "event": "restart", **event, "restarted_at": time.time(), "rebuild_s": time.monotonic() - started})
