"""The Orchestrator: the lockstep loop and the consistency checks (its recovery policy is in
recovery_policy.py).

    # one machine, a local Ray instance started for the run (CPU, gloo):
    distrib train --config configs/local.yaml
    # an existing cluster, one node or many (GPUs -> NCCL):
    RAY_ADDRESS=ray://head:10001 distrib train --config configs/gpu.yaml

    from distrib import Orchestrator, load_config
    with Orchestrator(load_config("configs/local.yaml")) as orch:
        orch.step()          # one lockstep step
        orch.train()         # the rest of cfg.steps

The driver owns the step counter and decides *when*: which calls to queue, when to
check, snapshot and recover. The ReplicaGroup (group.py) says how replicas are placed,
called and waited on; the RunDir (rundir.py) how the run's files and snapshots are
kept. The driver never touches a tensor's maths and imports no torch unless it must
load weights.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ray

from distrib import cadence, checkpoint, comm, faults, folders, preflight, recovery
from distrib.cluster import cluster_gpus, connect_ray
from distrib.config import RunConfig
from distrib.errors import ConfigError, DivergenceError, ReplicaError
from distrib.group import ReplicaGroup
from distrib.hang import HangLimit
from distrib.metrics import EvalMetrics, StepMetrics, aggregate, combine_evals, format_summary, summarize
from distrib.progress import Progress, say
from distrib.protocol import Fingerprint, NodeInfo, first_difference
from distrib.recovery_policy import RecoveryPolicy
from distrib.rundir import RunDir
from distrib.schedule import lr_at
from distrib.stopping import StopRequest
from distrib.watchers import Watchers


@dataclass(frozen=True)
class _Call:
    """A call queued on the replicas: `steps` (first, count), or a `check` or `checkpoint`
    after step first - 1 (a checkpoint also holds rank 0's snapshot ref)."""

    kind: Literal["steps", cadence.BoundaryCall]
    first_step: int
    num_steps: int
    refs: list
    snapshot_ref: ray.ObjectRef | None = None


class Orchestrator(RecoveryPolicy):
    """Runs one training run on a group of Replica actors; use it as a context manager.

    When a replica dies, stalls or fails, the driver heals the group (recovery.py): the
    survivors keep their state, the lost ranks are replaced and filled from a survivor,
    and the interrupted step runs again; where that cannot be done (or under `recovery:
    restart`) it starts a fresh group from the newest snapshot. Up to cfg.max_restarts
    recoveries; the finished run is bit-identical to an uninterrupted one.
    Shutdown (killing the replicas, freeing their placement group, closing files) is
    idempotent and happens on errors and Ctrl-C as well.
    """

    def __init__(self, cfg: RunConfig, *, progress: bool = True, resume_dir: str | Path | None = None):
        self.requested_cfg = cfg
        self.cfg = cfg  # resolved (no `auto` left, run_dir made) by start()
        self.progress = progress
        self.resume_dir = resume_dir  # a path or a URI: Path() would turn s3://b/k into s3:/b/k
        self._resume_from = None if resume_dir is None else RunDir.newest_to_resume(resume_dir, say=self._say)
        if self._resume_from is not None:  # before Ray starts; again in start(), with `auto` resolved
            checkpoint.check_compatible(self._resume_from, cfg, resolved=False)
        self._weights = self._load_weights() if self._resume_from is None else None  # before Ray, too
        self.step_count = 0
        """Steps finished on every replica; the next step to run."""
        self.history: list[StepMetrics] = []
        self.evals: list[EvalMetrics] = []
        self.checks_passed = 0
        self._watchers: Watchers | None = None  # from start()
        self.rundir: RunDir | None = None
        self._group: ReplicaGroup | None = None
        self._weights_ref: ray.ObjectRef | None = None
        self._faults: list[faults.Fault] = []
        self._hang_limit: HangLimit | None = None
        self._recoveries: recovery.RecoveryLog | None = None
        self._formed_at_step = 0  # the step at which the group was last formed (_group_formed)
        self._stop = StopRequest(cfg.stop_grace_s)
        self._training = False
        self._closed = False

    # ---- start-up -------------------------------------------------------------------------
    def __enter__(self) -> Orchestrator:
        self.start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.shutdown(orderly=exc_type is None)

    def start(self) -> None:
        """Open the run directory, place and start the replicas, connect them, and verify
        they hold identical state."""
        try:
            preflight.check(self.requested_cfg, local=not (ray.is_initialized() or os.environ.get("RAY_ADDRESS")),
                            new_run=self.resume_dir is None)
            connect_ray()
            cfg = comm.resolve_config(self.requested_cfg, cluster_gpus=cluster_gpus())
            preflight.check_cluster_fit(cfg)  # a cluster without an autoscaler names what it lacks at once
            self.rundir = (RunDir.resume(self.resume_dir, cfg, say=self._say, newest=self._resume_from)
                           if self.resume_dir is not None else RunDir.create(cfg))
            self._resume_from = None  # the run directory keeps it, as its snapshot, until the next one
            self.cfg = self.rundir.cfg
            self._hang_limit = HangLimit(self.cfg)
            self._recoveries = recovery.RecoveryLog(self.rundir.record_event, max_restarts=self.cfg.max_restarts)
            self._watchers = Watchers(self.cfg, run_name=self.rundir.path.name, say=self._say,
                                      name=lambda rank: self._group.name([rank]))
            self.rundir.write_json("classes.json", folders.class_names(self.cfg))
            snapshot = self.rundir.snapshot
            self.step_count = snapshot.step if snapshot else 0
            self._faults = faults.parse(self.cfg.faults, num_workers=self.cfg.num_workers)
            self._weights_ref = ray.put(self._weights if snapshot is None else None)
            self._weights = None  # Ray's object store holds them now
            self._start_group()
            if snapshot is not None:  # a resume: what was due where it goes on may never have run
                self._boundary_after_recovery()
        except BaseException:
            self.shutdown()
            if self.rundir is not None and self.resume_dir is None:
                self.rundir.discard()  # nothing ran: leave no half-made run directory behind
            raise

    def _load_weights(self):
        if self.cfg.weights == "none":
            return None  # seeded init on each replica; no torch import in the driver
        from distrib.model import load_weights

        return load_weights(self.cfg.weights, num_classes=self.cfg.num_classes)

    def _start_group(self) -> None:
        """A fresh group at step_count, from the newest snapshot (if any), verified identical."""
        snapshot = self.rundir.snapshot
        self._group = ReplicaGroup(self.cfg, say=self._say, check_abort=self._stop.check_abort,
                                   wait_deadline=lambda: self._stop.deadline)
        self._group.start(weights=self._weights_ref, snapshot=ray.put(snapshot.payload) if snapshot else None,
                          first_step=self.step_count,
                          faults=[f for f in self._faults if f.step >= self.step_count])
        self._group_formed()
        self.check_consistency()

    @property
    def restarts(self) -> int:
        """Recoveries so far (heals and restarts)."""
        return self._recoveries.count if self._recoveries is not None else 0

    @property
    def replicas(self) -> list:
        """The replicas' actor handles, index = world rank (empty before start and after shutdown)."""
        return self._group.replicas if self._group is not None else []

    @property
    def nodes(self) -> list[NodeInfo]:
        """Where each rank runs: node address and id, host, pid, GPUs, device name."""
        return self._group.nodes if self._group is not None else []

    @property
    def run_dir(self) -> Path | None:
        """The run's directory (None before start)."""
        return self.rundir.path if self.rundir is not None else None

    # ---- stopping early -----------------------------------------------------------------
    def request_stop(self, reason: str) -> bool:
        """Ask `train` to stop at the next step boundary: finish the calls in flight, check, write a
        checkpoint there and return, within cfg.stop_grace_s (past it, `train` raises the wait's
        ReplicaTimeout). A second request, or one before training began, abandons the wait within half
        a second (StoppedAtOnce). Returns whether this one stops gracefully. Signal-handler safe."""
        return self._stop.request(reason, training=self._training)

    @property
    def stopped_by(self) -> str | None:
        """Why the run was asked to stop early (e.g. 'SIGTERM'); None while it may run on."""
        return self._stop.reason

    def _checkpoint_now(self, *, wait_for_disk: bool) -> None:
        """Check the replicas and save a snapshot at step_count, unless one is there already."""
        snapshot = self.rundir.snapshot
        if self.step_count == 0 or (snapshot is not None and snapshot.step == self.step_count):
            return
        self._finish_check(_Call("checkpoint", self.step_count, 0, self._group.call("fingerprint"),
                                 snapshot_ref=self._group.replicas[0].begin_snapshot.remote()),
                           queued_to=self.step_count - 1)
        if wait_for_disk:
            self.rundir.flush()

    # ---- training --------------------------------------------------------------------------
    def step(self) -> StepMetrics:
        """Run one lockstep step on every replica and return its metrics."""
        return self.train(1)[-1]

    def train(self, num_steps: int | None = None) -> list[StepMetrics]:
        """Run `num_steps` more steps (default: up to cfg.steps); returns their metrics.

        Keeps cfg.calls_in_flight calls queued on every replica so none waits on the
        driver; compares fingerprints every cfg.check_every steps and at cfg.steps;
        snapshots every cfg.checkpoint_every steps; recovers from lost or hung replicas.
        Ends early, with a checkpoint at the step reached, after `request_stop`; moves off
        a node that Ray drains (a preemption notice) the same way, with no step redone.
        """
        cfg = self.cfg
        end = cfg.steps if num_steps is None else self.step_count + num_steps
        if end > cfg.steps:
            raise ValueError(f"{num_steps} more steps would pass steps={cfg.steps}; raise steps in the config")
        start_step = self.step_count
        progress = Progress(total_steps=cfg.steps, steps_done=self.step_count, end_step=end, enabled=self.progress)
        self._training = True
        try:
            self._stop.check_abort()
            while True:
                try:
                    self._run_until(end, progress)
                    if self.stopped_by is not None:
                        self._checkpoint_now(wait_for_disk=True)
                    elif self.step_count < end:  # left off early for a node being drained
                        self._leave_draining_nodes()
                        progress.rewind(self.step_count)
                        continue
                    break
                except ReplicaError as err:
                    if self.stopped_by is not None:  # no recovery while stopping: stop with what is on disk
                        raise
                    self._recover(err)
                    progress.rewind(self.step_count)
        finally:
            self._training = False
            self._recoveries.flush()  # a recovery with no step after it (the run failed) is still told
            self._watchers.flush(recoveries=self.restarts, checks_passed=self.checks_passed)
            progress.close()
        self.rundir.flush()
        if self.step_count == cfg.steps:
            self._write_summary()
        return [m for m in self.history if m.step >= start_step]

    def _run_until(self, end: int, progress: Progress) -> None:
        """Steps up to `end`, with calls_in_flight calls queued ahead, and their checks."""
        queue: deque[_Call] = deque()
        next_step = self.step_count
        last_done = time.perf_counter()
        while next_step < end or queue:
            growing = self._group.ready_to_grow()  # a shrunk group grows once the queue is done
            # Only calls of steps count: a check or snapshot queued between them must not leave the
            # replicas without steps while the driver waits on it.
            behind_checkpoint = bool(queue) and queue[0].kind == "checkpoint"
            depth = cadence.step_calls_queued(self.cfg, behind_checkpoint=behind_checkpoint)
            while next_step < end and sum(c.kind == "steps" for c in queue) < depth \
                    and not self._leaving() and not growing:
                next_step = self._queue(queue, next_step, end)
            if not queue and growing:
                self._grow()
                last_done = time.perf_counter()  # the grow's seconds are no step's wall time
                continue
            if not queue:
                return
            call = queue.popleft()
            try:  # queued_to: the last step handed out, which is what a failure may have reached
                if call.kind == "steps":
                    last_done = self._finish_steps(call, last_done, queued_to=next_step - 1, progress=progress)
                elif call.kind == "eval":  # not training: the next step's wall time starts after it
                    last_done = self._finish_eval(call, last_done, queued_to=next_step - 1)
                else:
                    self._finish_check(call, queued_to=next_step - 1)
            except ReplicaError as err:  # the recovery consumes what is still queued
                err.outstanding = [(rank, ref) for c in (call, *queue) for rank, ref in enumerate(c.refs)]
                err.outstanding += [(0, c.snapshot_ref) for c in (call, *queue) if c.snapshot_ref is not None]
                raise

    def _queue(self, queue: deque[_Call], next_step: int, end: int) -> int:
        """Queue one call of steps from `next_step`, then the checks, checkpoint or evaluation
        due at its end (cadence.py); returns the step after the queued ones."""
        count = cadence.call_length(self.cfg, next_step, end)
        queue.append(_Call("steps", next_step, count, self._group.call("run_steps", next_step, count)))
        next_step += count
        for kind in cadence.boundary_calls(self.cfg, next_step):
            if kind == "eval":
                queue.append(_Call("eval", next_step, 0, self._group.call("evaluate")))
                continue
            prints = self._group.call("fingerprint")  # first: it averages the buffers the snapshot holds
            snapshot_ref = self._group.replicas[0].begin_snapshot.remote() if kind == "checkpoint" else None
            queue.append(_Call(kind, next_step, 0, prints, snapshot_ref=snapshot_ref))
        return next_step

    def _finish_steps(self, call: _Call, last_done: float, *, queued_to: int, progress: Progress) -> float:
        """Wait for a call of steps, record its metrics; returns when it finished (perf_counter)."""
        last_step = call.first_step + call.num_steps - 1
        what = f"step {call.first_step}" if call.num_steps == 1 else f"steps {call.first_step}-{last_step}"
        if queued_to > last_step:
            what += f" (steps up to {queued_to} queued)"
        stall_after_s = self._hang_limit.stall_limit_s() if call.first_step > self._formed_at_step else None
        records = self._group.wait(call.refs, what, self._hang_limit.limit_s(call.num_steps), step=queued_to,
                                   stall_after_s=stall_after_s)
        now = time.perf_counter()
        wall_s = (now - last_done) / call.num_steps
        self._hang_limit.record(wall_s, call.num_steps)
        for i in range(call.num_steps):
            metrics = self._record_step(call.first_step + i, [r[i] for r in records], wall_s)
        self.step_count = last_step + 1
        if self._recoveries.step_finished(metrics.finished_at):
            self._group.replenish_spares()
        progress.advance(call.num_steps, self.step_count, metrics)
        return now

    def _record_step(self, step: int, rank_records: list, wall_s: float, partial: bool = False) -> StepMetrics:
        metrics = aggregate(step=step, rank_records=rank_records, loss_kind=self.cfg.loss, wall_s=wall_s,
                            global_batch_size=self.cfg.global_batch_size, finished_at=time.time(),
                            lr=lr_at(self.cfg, step), partial=partial)
        self.history.append(metrics)
        self.rundir.write_metrics(metrics)
        self._watchers.step(metrics, rank_records, recoveries=self.restarts, checks_passed=self.checks_passed)
        return metrics

    def _finish_eval(self, call: _Call, started: float, *, queued_to: int) -> float:
        """Wait for an evaluation queued after step first - 1, record it; returns when it finished."""
        counts = self._group.wait(call.refs, f"the evaluation after step {call.first_step - 1}",
                                  self.cfg.step_timeout_s, step=queued_to)
        now = time.perf_counter()
        metrics = combine_evals(step=call.first_step - 1, rank_records=counts, eval_s=now - started,
                                finished_at=time.time())
        self.evals.append(metrics)
        self.rundir.write_metrics(metrics)
        self._watchers.evaluation(metrics)
        self._say(f"eval after step {metrics.step}: loss {metrics.loss:.4f}, top-1 {metrics.top1:.4f}, "
                  f"top-5 {metrics.top5:.4f} ({metrics.count} images, {metrics.eval_s:.1f} s)")
        return now

    def evaluate(self) -> EvalMetrics:
        """Evaluate the held-out set now, after step_count steps, and record it like a scheduled one."""
        if self.cfg.data == "folder" and not (self.cfg.val_dir or self.cfg.val_fraction):
            raise ConfigError("evaluate: data: folder has no held-out set; set val_dir or val_fraction")
        call = _Call("eval", self.step_count, 0, self._group.call("evaluate"))
        self._finish_eval(call, time.perf_counter(), queued_to=self.step_count - 1)
        return self.evals[-1]

    def _finish_check(self, call: _Call, *, queued_to: int) -> None:
        """Wait for a check's fingerprints and compare them; for a checkpoint, save rank 0's state."""
        what = f"the {call.kind} after step {call.first_step - 1}"
        timeout_s = self._hang_limit.limit_s(1)
        self.compare(self._group.wait(call.refs, what, timeout_s, step=queued_to), after_step=call.first_step - 1)
        if call.kind == "checkpoint":  # begun in order with the steps, taken beside them
            self._group.wait([call.snapshot_ref], what, timeout_s, step=queued_to)
            taken = self._group.replicas[0].take_snapshot.remote(call.first_step)
            self.rundir.save(call.first_step, self._group.wait([taken], what, timeout_s, step=queued_to)[0])

    def _leaving(self) -> bool:
        """Whether to queue no more steps: a stop was asked for, or a replica's node is being drained."""
        return self.stopped_by is not None or bool(self._group.draining_ranks())

    # ---- checks and reads ------------------------------------------------------------------
    def check_consistency(self) -> None:
        """Compare every replica's parameters, momentum and buffers with rank 0's, bit for bit."""
        prints = self._group.wait(self._group.call("fingerprint"), f"the check after step {self.step_count - 1}",
                                  self.cfg.step_timeout_s)
        self.compare(prints, after_step=self.step_count - 1)

    def compare(self, prints: list[Fingerprint], *, after_step: int) -> None:
        """Raise DivergenceError naming the first rank and tensor whose fingerprint (prints[rank],
        from Replica.fingerprint) differs from rank 0's; count a passed check otherwise."""
        difference = first_difference(prints)
        if difference is not None:
            rank, what = difference
            when = "at start-up" if after_step < 0 else f"after step {after_step}"
            raise DivergenceError(f"replicas diverged {when}: {self._group.name([rank])} {what}")
        self.checks_passed += 1

    def state(self) -> dict:
        """Rank 0's model and optimizer state (CPU tensors), after a consistency check, so it
        stands for every replica."""
        self.check_consistency()
        return self._group.wait([self._group.replicas[0].state.remote()], "the state read",
                                self.cfg.step_timeout_s)[0]

    def profile(self) -> dict:
        """What the overlap hides, on the live group (Trainer.profile; the model is left as it was), mean over ranks."""
        results = self._group.wait(self._group.call("profile", self.step_count), "the profile",
                                   self.cfg.step_timeout_s)
        return {key: statistics.fmean(r[key] for r in results) for key in results[0]}

    def summary(self) -> dict:
        """Throughput and phase times so far (the first call's steps are warm-up), and the held-out results."""
        return summarize(self.history, self.evals, global_batch_size=self.cfg.global_batch_size,
                         warmup_steps=self.cfg.steps_per_call)

    def _write_summary(self) -> None:
        summary = {**self.summary(), "checks_passed": self.checks_passed, "restarts": self.restarts,
                   **self._recoveries.summary(sum(m.wall_s for m in self.history)),
                   "num_workers": self.cfg.num_workers, "device": self.cfg.device, "backend": self.cfg.backend,
                   **self._watchers.summary()}
        self.rundir.write_json("summary.json", summary)
        self._say(format_summary(summary))

    def _say(self, text: str) -> None:
        if self.progress:
            say(text)

    # ---- shutdown --------------------------------------------------------------------------
    def shutdown(self, *, orderly: bool = False) -> None:
        """Kill the replicas (`orderly`: once they closed their data loaders), free their
        placement group, finish the checkpoint being written and close the run's files; safe
        to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._group is not None:
            self._group.stop(orderly=orderly)
        if self.rundir is not None:
            self.rundir.close()
