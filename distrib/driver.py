"""The Orchestrator: places the replicas, starts them, runs steps in lockstep, checks them.

    # one machine, a local Ray instance started for the run (CPU, gloo):
    distrib train --config configs/local.yaml
    # an existing cluster, one node or many (GPUs -> NCCL):
    RAY_ADDRESS=ray://head:10001 distrib train --config configs/gpu.yaml

    from distrib import Orchestrator, load_config
    with Orchestrator(load_config("configs/local.yaml")) as orch:
        orch.step()          # one lockstep step
        orch.train()         # the rest of cfg.steps

The driver owns the step counter, the metrics and every wait; it never touches a
tensor's maths and imports no torch unless it must load weights. Each wait on a
replica has a timeout, and each failure names the rank, its node and the step.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from distrib import checkpoint, comm, faults
from distrib.config import ConfigError, RunConfig, to_dict
from distrib.metrics import MetricsLog, StepMetrics, aggregate, format_summary, summarize
from distrib.replica import CONCURRENCY_GROUPS, Replica

log = logging.getLogger(__name__)


class ReplicaError(RuntimeError):
    """A replica failed, died or timed out; the message names the ranks, their nodes and the step."""

    def __init__(self, message: str, *, ranks: list[int], step: int | None = None):
        super().__init__(message)
        self.ranks = ranks
        self.step = step
        """Last step handed to the replicas when it failed (None outside training)."""


class ReplicaTimeout(ReplicaError):
    """Replicas did not finish a call within its timeout (a hang, a stall, a lost peer)."""


class DivergenceError(RuntimeError):
    """Replicas that must be bit-identical are not; names the rank and the first differing tensor."""


class PlacementError(RuntimeError):
    """The cluster could not hold all the replicas within start_timeout_s."""


def connect_ray(address: str | None = None) -> bool:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS); without one, start a local
    instance with this machine's CPUs (and GPUs). Returns True when it started a local one."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    return True


def resolve(cfg: RunConfig, *, cluster_gpus: float) -> RunConfig:
    """`cfg` with every `auto` replaced by what this cluster gets: GPU speed settings on cuda, fp32 on cpu."""
    device = comm.resolve_device(cfg.device, cluster_gpus)
    on_gpu = device == "cuda"
    return cfg.replace(
        device=device,
        backend=comm.resolve_backend(cfg.backend, device),
        precision=cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu else "fp32"),
    )


@dataclass(frozen=True)
class _Call:
    """A call queued on the replicas: `steps` (first, count), or a `check` or `checkpoint`
    after step first - 1 (a checkpoint also holds rank 0's snapshot ref)."""

    kind: str
    first_step: int
    num_steps: int
    refs: list
    snapshot_ref: object = None


class Orchestrator:
    """Runs one training run on a group of Replica actors; use it as a context manager.

    When a replica dies or hangs, the driver tears the group down, starts a fresh one
    (new placement, new rendezvous), restores the newest snapshot and goes on, up to
    cfg.max_restarts times; the finished run is bit-identical to an uninterrupted one.
    Shutdown (killing the replicas, freeing their placement group, closing files) is
    idempotent and happens on errors and Ctrl-C as well.
    """

    def __init__(self, cfg: RunConfig, *, progress: bool = True, resume_dir: str | Path | None = None):
        self.requested_cfg = cfg
        self.cfg = cfg  # resolved (no `auto` left) by start()
        self.progress = progress
        self.resume_dir = Path(resume_dir) if resume_dir is not None else None
        self.step_count = 0
        """Steps finished on every replica; the next step to run."""
        self.history: list[StepMetrics] = []
        self.checks_passed = 0
        self.restarts = 0
        self.run_dir: Path | None = None
        self._replicas: list = []
        self._nodes: list[dict] = []
        self._placement = None
        self._metrics: MetricsLog | None = None
        self._weights_ref = None
        self._snapshot: tuple[int, object] | None = None
        """(steps done, object ref of the snapshot bytes): where a recovery starts."""
        self._faults: list[faults.Fault] = []
        self._step_walls: deque[float] = deque(maxlen=50)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._checkpoint_write: Future | None = None
        self._closed = False

    # ---- start-up -------------------------------------------------------------------------
    def __enter__(self) -> Orchestrator:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def start(self) -> None:
        """Place and start the replicas, connect them, and verify they hold identical state."""
        try:
            connect_ray()
            self.cfg = resolve(self.requested_cfg, cluster_gpus=ray.cluster_resources().get("GPU", 0))
            if self.resume_dir is not None:
                self._open_resumed_run()
            else:
                self._make_run_dir()
            self._faults = faults.parse(self.cfg.faults, num_workers=self.cfg.num_workers)
            self._weights_ref = ray.put(self._load_weights() if self._snapshot is None else None)
            self._start_group()
        except BaseException:
            self.shutdown()
            raise

    def _make_run_dir(self) -> None:
        run_dir = Path(self.cfg.run_dir.format(time=time.strftime("%Y%m%d-%H%M%S")))
        if (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"run_dir: {str(run_dir)!r} already holds a run (metrics.jsonl); "
                              "choose another run_dir, remove it, or resume it with --resume")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self._write_config()
        self._metrics = MetricsLog(run_dir / "metrics.jsonl")

    def _write_config(self) -> None:
        """RUN_DIR/config.yaml: the resolved config this run goes on with (what --resume reads)."""
        self.cfg = self.cfg.replace(run_dir=str(self.run_dir))
        tmp = self.run_dir / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        tmp.replace(self.run_dir / "config.yaml")

    def _open_resumed_run(self) -> None:
        """Continue the run in resume_dir from its newest valid checkpoint."""
        self.run_dir = self.resume_dir
        self.cfg = self.cfg.replace(run_dir=str(self.run_dir))
        ckpt, skipped = checkpoint.newest_valid(self.run_dir)
        for reason in skipped:
            self._say(f"skipping a checkpoint: {reason}")
        checkpoint.check_compatible(ckpt, self.cfg)
        self._write_config()  # keeps what --set changed (steps, say) for the next resume
        self._snapshot = (ckpt.step, ray.put(ckpt.payload))
        self.step_count = ckpt.step
        self._metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self._metrics.truncate(ckpt.step)
        self._say(f"resuming {self.run_dir} at step {ckpt.step} from {ckpt.path.name}")

    def _load_weights(self):
        if self.cfg.weights == "none":
            return None  # seeded init on each replica; no torch import in the driver
        from distrib.model import load_weights

        return load_weights(self.cfg.weights, num_classes=self.cfg.num_classes)

    def _bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cfg.cpus_per_worker}
        if self.cfg.device == "cuda":
            bundle["GPU"] = 1
        return bundle

    def _start_group(self) -> None:
        """Reserve resources, start one replica per bundle, rendezvous, restore, verify."""
        self._place()
        self._start_replicas()
        self.check_consistency()

    def _place(self) -> None:
        """Reserve one bundle per worker; say what is missing while waiting, then fail clearly."""
        cfg, bundle = self.cfg, self._bundle()
        self._placement = placement_group([bundle] * cfg.num_workers, strategy=cfg.placement_strategy)
        deadline = time.monotonic() + cfg.start_timeout_s
        ready = self._placement.ready()
        while not ray.wait([ready], timeout=min(5.0, max(0.0, deadline - time.monotonic())))[0]:
            want = f"{cfg.num_workers} x {bundle} ({cfg.placement_strategy})"
            have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            if time.monotonic() >= deadline:
                raise PlacementError(
                    f"could not place {want} within {cfg.start_timeout_s:g} s; the cluster has {have} free: "
                    "lower num_workers or cpus_per_worker, add nodes, or raise start_timeout_s")
            self._say(f"waiting for resources: {want}; free now: {have}")

    def _start_replicas(self) -> None:
        cfg = self.cfg
        actor_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Replica)
        self._replicas = [
            actor_class.options(
                num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.device == "cuda" else 0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement, placement_group_bundle_index=rank),
            ).remote(world_rank=rank, world_size=cfg.num_workers)
            for rank in range(cfg.num_workers)
        ]
        self._nodes = self._wait([r.node_info.remote() for r in self._replicas], "start-up", cfg.start_timeout_s)
        master_addr, master_port = self._wait([self._replicas[0].rendezvous_address.remote()],
                                              "rendezvous", cfg.start_timeout_s)[0]
        snapshot_ref = self._snapshot[1] if self._snapshot else None
        armed = [f for f in self._faults if f.step >= self.step_count]
        # Every rank's init must be in flight at once: each blocks until all have joined.
        self._wait([r.setup.remote(cfg, master_addr=master_addr, master_port=master_port, weights=self._weights_ref,
                                   snapshot=snapshot_ref, first_step=self.step_count, faults=armed)
                    for r in self._replicas], "process-group set-up", cfg.start_timeout_s)
        log.info("%d replicas on %s, %s/%s", cfg.num_workers, sorted({n["node"] for n in self._nodes}),
                 cfg.device, cfg.backend)

    @property
    def replicas(self) -> list:
        """The replicas' actor handles, index = world rank (empty before start and after shutdown)."""
        return list(self._replicas)

    # ---- waiting ---------------------------------------------------------------------------
    def _name(self, ranks: list[int]) -> str:
        def one(rank: int) -> str:
            if rank < len(self._nodes):
                node = self._nodes[rank]
                return f"rank {rank} (node {node['node']}, pid {node['pid']})"
            return f"rank {rank}"
        return ", ".join(one(r) for r in ranks)

    def _wait(self, refs: list, what: str, timeout_s: float, *, step: int | None = None) -> list:
        """Results of one call per rank (refs[i] is rank i's), failing fast on the first error."""
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                ranks = sorted(pending.values())
                raise ReplicaTimeout(f"{what} did not finish within {timeout_s:.1f} s: {self._diagnose(ranks)}",
                                     ranks=ranks, step=step)
            rank = pending.pop(ready[0])
            try:
                results[rank] = ray.get(ready[0])
            except ray.exceptions.RayActorError as err:
                raise ReplicaError(f"{self._name([rank])} died during {what}: {_first_line(err)}",
                                   ranks=[rank], step=step) from err
            except ray.exceptions.RayTaskError as err:
                cause = f"{type(err.cause).__name__}: {_first_line(err.cause)}"
                # A peer's death breaks the collective of the ranks still alive; blame the dead one.
                dead = self._dead_among(pending)
                if dead:
                    raise ReplicaError(f"{self._name(dead)} died during {what} (so {self._name([rank])} "
                                       f"failed: {cause})", ranks=dead, step=step) from err
                raise ReplicaError(f"{self._name([rank])} failed during {what}: {cause}",
                                   ranks=[rank], step=step) from err
        return results

    @staticmethod
    def _dead_among(pending: dict, grace_s: float = 2.0) -> list[int]:
        """Ranks (of `pending`: ref -> rank) whose actor is found dead within `grace_s`."""
        if not pending:
            return []
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=grace_s)
        dead = []
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                dead.append(pending[ref])
            except ray.exceptions.RayError:
                pass
        return sorted(dead)

    def _diagnose(self, late_ranks: list[int]) -> str:
        """Name the ranks holding the others up: those that do not answer a probe, else those
        furthest behind (the rest are waiting for them in a collective)."""
        probes = [r.position.remote() for r in self._replicas]
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=3.0)
        positions = {}
        for rank, ref in enumerate(probes):
            if ref in ready:
                try:
                    positions[rank] = ray.get(ref)
                except ray.exceptions.RayError:
                    pass
        silent = [r for r in range(len(probes)) if r not in positions]
        if silent:
            return f"{self._name(silent)} did not answer a probe (stopped, frozen or gone)"
        order = ("setup", "idle", "data", "forward", "backward", "optimizer", "done")

        def progress(rank: int) -> tuple[int, int]:
            step, phase = positions[rank]
            return step, order.index(phase)

        behind = min(progress(r) for r in late_ranks)
        stuck = [r for r in late_ranks if progress(r) == behind]
        step, phase = positions[stuck[0]]
        waiting = "" if len(stuck) == len(positions) else "; the other ranks are waiting further on"
        return f"{self._name(stuck)} stuck at step {step} in {phase}{waiting}"

    def _call_timeout(self, num_steps: int) -> float:
        """step_timeout_s until 3 calls are timed; then hang_timeout_factor x the median step, floored."""
        cfg = self.cfg
        if len(self._step_walls) < 3:
            return cfg.step_timeout_s
        derived = cfg.hang_timeout_factor * statistics.median(self._step_walls) * num_steps
        return min(cfg.step_timeout_s, max(cfg.hang_timeout_min_s, derived))

    # ---- training --------------------------------------------------------------------------
    def step(self) -> StepMetrics:
        """Run one lockstep step on every replica and return its metrics."""
        return self.train(1)[-1]

    def train(self, num_steps: int | None = None) -> list[StepMetrics]:
        """Run `num_steps` more steps (default: up to cfg.steps); returns their metrics.

        Keeps cfg.calls_in_flight calls queued on every replica so none waits on the
        driver; compares fingerprints every cfg.check_every steps and at cfg.steps;
        snapshots every cfg.checkpoint_every steps; recovers from lost or hung replicas.
        """
        cfg = self.cfg
        end = cfg.steps if num_steps is None else self.step_count + num_steps
        if end > cfg.steps:
            raise ValueError(f"{num_steps} more steps would pass steps={cfg.steps}; raise steps in the config")
        start_step = self.step_count
        # A bar on a terminal; in a log (a job's output, CI) a plain line every tenth of the run.
        on_terminal = sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step_count, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not (self.progress and on_terminal))
        try:
            while True:
                try:
                    self._run_until(end, bar, log_lines=self.progress and not on_terminal)
                    break
                except ReplicaError as err:
                    self._recover(err)
                    bar.reset(total=cfg.steps)
                    bar.update(self.step_count)
        finally:
            bar.close()
        self._finish_checkpoint_write()
        if self.step_count == cfg.steps:
            self._write_summary()
        return [m for m in self.history if m.step >= start_step]

    def _run_until(self, end: int, bar: tqdm, *, log_lines: bool) -> None:
        cfg = self.cfg
        log_every = max(1, cfg.steps // 10)
        queue: deque[_Call] = deque()
        next_step = self.step_count
        last_done = time.perf_counter()
        while next_step < end or queue:
            while next_step < end and len(queue) < cfg.calls_in_flight:
                count = self._call_length(next_step, end)
                queue.append(_Call("steps", next_step, count,
                                   [r.run_steps.remote(next_step, count) for r in self._replicas]))
                next_step += count
                if cfg.checkpoint_every and next_step % cfg.checkpoint_every == 0:
                    queue.append(_Call("checkpoint", next_step, 0, [r.fingerprint.remote() for r in self._replicas],
                                       snapshot_ref=self._replicas[0].snapshot.remote()))
                elif (cfg.check_every and next_step % cfg.check_every == 0) or next_step == cfg.steps:
                    queue.append(_Call("check", next_step, 0, [r.fingerprint.remote() for r in self._replicas]))
            call = queue.popleft()
            if call.kind in ("check", "checkpoint"):
                what = f"the {call.kind} after step {call.first_step - 1}"
                timeout_s = self._call_timeout(1)
                self._compare(self._wait(call.refs, what, timeout_s, step=next_step - 1),
                              after_step=call.first_step - 1)
                if call.kind == "checkpoint":
                    payload = self._wait([call.snapshot_ref], what, timeout_s, step=next_step - 1)[0]
                    self._keep_snapshot(call.first_step, payload)
                continue
            last_step = call.first_step + call.num_steps - 1
            what = f"step {call.first_step}" if call.num_steps == 1 else f"steps {call.first_step}-{last_step}"
            if next_step - 1 > last_step:
                what += f" (steps up to {next_step - 1} queued)"
            # step=: the last step handed out, which is what a failure may have reached.
            records = self._wait(call.refs, what, self._call_timeout(call.num_steps), step=next_step - 1)
            now = time.perf_counter()
            wall_s, last_done = (now - last_done) / call.num_steps, now
            self._step_walls.extend([wall_s] * call.num_steps)
            for i in range(call.num_steps):
                metrics = aggregate(step=call.first_step + i, rank_records=[r[i] for r in records],
                                    loss_kind=cfg.loss, global_batch_size=cfg.global_batch_size,
                                    wall_s=wall_s, finished_at=time.time())
                self.history.append(metrics)
                self._metrics.write(metrics)
            self.step_count = last_step + 1
            bar.update(call.num_steps)
            bar.set_postfix(loss=f"{metrics.loss:.4f}", img_s=f"{metrics.images_per_s:.0f}")
            if log_lines and (self.step_count % log_every < call.num_steps or self.step_count == end):
                self._say(f"step {self.step_count}/{cfg.steps}: loss {metrics.loss:.4f}, "
                          f"{metrics.images_per_s:.0f} images/s")

    def _call_length(self, first_step: int, end: int) -> int:
        """Steps in the next call: steps_per_call, cut so calls end on check and checkpoint steps and at `end`."""
        count = min(self.cfg.steps_per_call, end - first_step)
        for every in (self.cfg.check_every, self.cfg.checkpoint_every):
            if every:
                count = min(count, every - first_step % every)
        return count

    def _keep_snapshot(self, step: int, payload: bytes) -> None:
        """Hold the snapshot for recovery (in the driver's object store) and write it to disk
        on a background thread (hashing and fsync take ~1 s for resnet18), so the driver
        goes on feeding the replicas meanwhile. One write at a time, in step order."""
        self._snapshot = (step, ray.put(payload))
        self._finish_checkpoint_write()
        self._checkpoint_write = self._writer.submit(checkpoint.write, self.run_dir, step=step, cfg=self.cfg,
                                                     payload=payload, keep=self.cfg.keep_checkpoints)

    def _finish_checkpoint_write(self) -> None:
        """Wait for the checkpoint being written (raising its error, if any)."""
        if self._checkpoint_write is not None:
            pending, self._checkpoint_write = self._checkpoint_write, None
            pending.result()

    def _recover(self, err: ReplicaError) -> None:
        """Replace the whole group and go back to the newest snapshot (or step 0), or give up."""
        cfg = self.cfg
        if self.restarts >= cfg.max_restarts:
            raise ReplicaError(f"{err} (no restarts left: max_restarts={cfg.max_restarts})",
                               ranks=err.ranks, step=err.step) from err
        self.restarts += 1
        detected_at = time.time()
        last_progress_at = self.history[-1].finished_at if self.history else None
        lost_nodes = sorted({self._nodes[r]["node"] for r in err.ranks if r < len(self._nodes)})
        restore_step = self._snapshot[0] if self._snapshot else 0
        self._say(f"restart {self.restarts}/{cfg.max_restarts}: {err}; going back to step {restore_step}")
        self._stop_group()
        if err.step is not None:  # a fault is spent once its step was handed out: do not re-arm it
            self._faults = [f for f in self._faults if f.step > err.step]
        self.step_count = restore_step
        self.history = [m for m in self.history if m.step < restore_step]
        self._metrics.truncate(restore_step)
        self._start_group()
        event = {"event": "restart", "restart": self.restarts, "ranks": err.ranks, "nodes": lost_nodes,
                 "step": err.step, "cause": str(err), "last_progress_at": last_progress_at,
                 "detected_at": detected_at, "restarted_at": time.time(),
                 "restored_step": restore_step}
        with (self.run_dir / "events.jsonl").open("a") as f:
            f.write(json.dumps(event) + "\n")

    def check_consistency(self) -> None:
        """Compare every replica's parameters, momentum and buffers with rank 0's, bit for bit."""
        prints = self._wait([r.fingerprint.remote() for r in self._replicas],
                            f"the check after step {self.step_count - 1}", self.cfg.step_timeout_s)
        self._compare(prints, after_step=self.step_count - 1)

    def _compare(self, prints: list[list[tuple[str, int]]], *, after_step: int) -> None:
        when = "at start-up" if after_step < 0 else f"after step {after_step}"
        for rank, theirs in enumerate(prints[1:], start=1):
            for (name, ours_sum), (their_name, their_sum) in zip(prints[0], theirs):
                if name != their_name or ours_sum != their_sum:
                    raise DivergenceError(f"replicas diverged {when}: {self._name([rank])} differs from rank 0, "
                                          f"first in {name}")
            if len(theirs) != len(prints[0]):
                raise DivergenceError(f"replicas diverged {when}: {self._name([rank])} holds "
                                      f"{len(theirs)} state tensors, rank 0 holds {len(prints[0])}")
        self.checks_passed += 1

    def state(self) -> dict:
        """Rank 0's model and optimizer state (CPU tensors), after a consistency check, so it
        stands for every replica."""
        self.check_consistency()
        return self._wait([self._replicas[0].state.remote()], "the state read", self.cfg.step_timeout_s)[0]

    def profile(self) -> dict:
        """What the overlap hides, measured on the live group (see Trainer.profile); the
        model is left as it was. Means over ranks."""
        results = self._wait([r.profile.remote(self.step_count) for r in self._replicas], "the profile",
                             self.cfg.step_timeout_s)
        return {key: statistics.fmean(r[key] for r in results) for key in results[0]}

    @property
    def nodes(self) -> list[dict]:
        """Where each rank runs: node address and id, host, pid, GPUs, device name."""
        return list(self._nodes)

    def summary(self) -> dict:
        """Throughput and phase times over the steps run so far; the first call's steps are warm-up."""
        return summarize(self.history, global_batch_size=self.cfg.global_batch_size,
                         warmup_steps=self.cfg.steps_per_call)

    def _write_summary(self) -> None:
        summary = {**self.summary(), "checks_passed": self.checks_passed, "restarts": self.restarts,
                   "num_workers": self.cfg.num_workers, "device": self.cfg.device, "backend": self.cfg.backend}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._say(format_summary(summary))

    def _say(self, text: str) -> None:
        if self.progress:
            tqdm.write(text, file=sys.stderr)

    # ---- shutdown --------------------------------------------------------------------------
    def _stop_group(self) -> None:
        """Kill the replicas and free their placement group (what a recovery replaces)."""
        for replica in self._replicas:
            try:
                ray.kill(replica, no_restart=True)
            except Exception:  # already dead: nothing left to free
                pass
        self._replicas = []
        if self._placement is not None:
            try:
                remove_placement_group(self._placement)
            except Exception:
                pass
            self._placement = None

    def shutdown(self) -> None:
        """Kill the replicas and free their placement group; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop_group()
        self._writer.shutdown(wait=True)  # a checkpoint being written is finished, never cut short
        if self._metrics is not None:
            self._metrics.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
