"""ReplicaGroup: the Ray side of a run. Places, starts, connects, waits on and stops replicas.

    group = ReplicaGroup(cfg, say=print)       # cfg resolved: no `auto` left
    group.start(weights=ref, snapshot=None, first_step=0, faults=[])
    refs = group.call("run_steps", 0, 1)        # one call per rank, index = world rank
    records = group.wait(refs, "step 0", timeout_s=30.0, step=0)
    group.stop()

It knows nothing of steps, snapshots or files: the driver hands it what to call and
how long to wait. Every wait has a timeout, and every failure it raises names the
rank, its node and pid: a dead replica is blamed rather than the peers whose
collective broke with it, and on a timeout a probe on each replica's own thread
names the one holding the others up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distrib.config import RunConfig
from distrib.errors import PlacementError, ReplicaError, ReplicaTimeout
from distrib.faults import Fault
from distrib.protocol import NodeInfo, Position
from distrib.replica import CONCURRENCY_GROUPS, Replica

log = logging.getLogger(__name__)

PLACEMENT_POLL_S = 5.0
"""While waiting for resources, say what is missing this often."""
DEAD_PEER_GRACE_S = 2.0
"""When a rank's collective fails, how long to look for a peer that died (the real cause)."""
PROBE_TIMEOUT_S = 3.0
"""How long a replica has to answer a position probe before it is called frozen or gone."""
WAIT_SLICE_S = 0.5
"""Waits on replicas are cut into slices this long, and `check_abort` runs between them: a
signal handler must not raise inside ray.wait (Ray turns that into a SystemError), so it
only sets a flag, which takes effect within a slice."""
CLOSE_TIMEOUT_S = 2.0
"""How long an orderly stop waits for the replicas to close their data loaders."""
DRAIN_POLL_S = 1.0
"""How often the group asks Ray which nodes are being drained (a preemption notice)."""


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


def cluster_gpus() -> float:
    """GPUs in the connected Ray cluster (what `device: auto` is resolved against)."""
    return ray.cluster_resources().get("GPU", 0)


def draining_nodes() -> dict[str, int]:
    """Nodes Ray is draining (preemption, scale-down): node id (hex) -> deadline in ms since the
    epoch, 0 for none. Ray 2.60 has no public API for it; Ray Train v2 reads this same one."""
    return ray._private.state.state.get_draining_nodes() or {}


class ReplicaGroup:
    """One placement group of Replica actors, rank i in bundle i; start once, stop once.

    A recovery replaces the whole object. `stop` is idempotent and safe after a failed `start`.
    """

    def __init__(self, cfg: RunConfig, *, say: Callable[[str], None],
                 check_abort: Callable[[], None] = lambda: None,
                 wait_deadline: Callable[[], float | None] = lambda: None):
        """`say` prints a message (waiting for resources); `check_abort` runs between the slices
        of every wait and may raise to abandon it (a second stop signal); `wait_deadline` gives a
        time.monotonic() past which no wait goes, or None (a stop's grace, which may begin while
        a wait is under way)."""
        self.cfg = cfg
        self._say = say
        self._check_abort = check_abort
        self._wait_deadline = wait_deadline
        self._placement = None
        self._replicas: list = []
        self._nodes: list[NodeInfo] = []
        self._draining: dict[str, int] = {}
        self._stopped = threading.Event()

    @property
    def replicas(self) -> list:
        """The actor handles, index = world rank (empty before start and after stop)."""
        return list(self._replicas)

    @property
    def nodes(self) -> list[NodeInfo]:
        """Where each rank runs, index = world rank (kept after stop, to name the lost)."""
        return list(self._nodes)

    # ---- start -------------------------------------------------------------------------------
    def start(self, *, weights: ray.ObjectRef, snapshot: ray.ObjectRef | None, first_step: int,
              faults: list[Fault]) -> None:
        """Reserve the bundles, start one replica in each, rendezvous, and set every replica up
        with `weights` and, if given, `snapshot` (taken after `first_step` steps)."""
        cfg = self.cfg
        self._place()
        actor_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Replica)
        self._replicas = [
            actor_class.options(
                num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.device == "cuda" else 0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement,
                                                                     placement_group_bundle_index=rank),
            ).remote(world_rank=rank, world_size=cfg.num_workers)
            for rank in range(cfg.num_workers)
        ]
        self._nodes = self.wait(self.call("node_info"), "start-up", cfg.start_timeout_s)
        master_addr, master_port = self.wait([self._replicas[0].rendezvous_address.remote()], "rendezvous",
                                             cfg.start_timeout_s)[0]
        # Every rank's init must be in flight at once: each blocks until all have joined.
        self.wait(self.call("setup", cfg, master_addr=master_addr, master_port=master_port, weights=weights,
                            snapshot=snapshot, first_step=first_step, faults=faults),
                  "process-group set-up", cfg.start_timeout_s)
        log.info("%d replicas on %s, %s/%s", cfg.num_workers, sorted({n.node for n in self._nodes}),
                 cfg.device, cfg.backend)
        threading.Thread(target=self._watch_drains, name="drain-watch", daemon=True).start()

    def _watch_drains(self) -> None:
        """Poll Ray for drained nodes of this group until it stops (a thread: no cost to the loop)."""
        node_ids = {n.node_id for n in self._nodes}
        while not self._stopped.wait(DRAIN_POLL_S):
            try:
                drained = draining_nodes()
            except Exception as err:  # a GCS hiccup: try again at the next poll
                log.debug("drain poll failed: %s", err)
                continue
            self._draining = {node: deadline for node, deadline in drained.items() if node in node_ids}

    def draining_ranks(self) -> dict[int, int]:
        """Ranks on nodes that Ray is draining -> the drain's deadline (ms since the epoch, 0: none)."""
        draining = self._draining
        if not draining:
            return {}
        return {rank: draining[n.node_id] for rank, n in enumerate(self._nodes) if n.node_id in draining}

    def _bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cfg.cpus_per_worker}
        if self.cfg.device == "cuda":
            bundle["GPU"] = 1
        return bundle

    def _place(self) -> None:
        """Reserve one bundle per worker; say what is missing while waiting, then fail clearly."""
        cfg, bundle = self.cfg, self._bundle()
        self._placement = placement_group([bundle] * cfg.num_workers, strategy=cfg.placement_strategy)
        deadline = time.monotonic() + cfg.start_timeout_s
        ready = self._placement.ready()
        polled = time.monotonic()
        while not ray.wait([ready], timeout=min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))[0]:
            self._check_abort()
            if time.monotonic() < min(deadline, polled + PLACEMENT_POLL_S):
                continue
            polled = time.monotonic()
            want = f"{cfg.num_workers} x {bundle} ({cfg.placement_strategy})"
            have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            if time.monotonic() >= deadline:
                raise PlacementError(
                    f"could not place {want} within {cfg.start_timeout_s:g} s; the cluster has {have} free: "
                    "lower num_workers or cpus_per_worker, add nodes, or raise start_timeout_s")
            self._say(f"waiting for resources: {want}; free now: {have}")

    # ---- calls and waits ---------------------------------------------------------------------
    def call(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """Call `method` on every replica, in rank order; returns the refs (index = rank)."""
        return [getattr(replica, method).remote(*args, **kwargs) for replica in self._replicas]

    def name(self, ranks: list[int]) -> str:
        """'rank 1 (node 10.0.0.2, pid 123), ...': how every message names replicas."""
        def one(rank: int) -> str:
            if rank < len(self._nodes):
                return f"rank {rank} (node {self._nodes[rank].node}, pid {self._nodes[rank].pid})"
            return f"rank {rank}"
        return ", ".join(one(r) for r in ranks)

    def wait(self, refs: list[ray.ObjectRef], what: str, timeout_s: float, *, step: int | None = None) -> list:
        """Results of one call per rank (refs[i] is rank i's), failing fast on the first error.

        Raises ReplicaTimeout (with a diagnosis of who holds the others up) when not all finish
        within `timeout_s`, and ReplicaError naming the dead or failed rank otherwise; `step`
        is carried on the error for the caller's recovery policy.
        """
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        started = time.monotonic()
        while pending:
            cap = self._wait_deadline()
            remaining_s = min(started + timeout_s, cap if cap is not None else float("inf")) - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, min(WAIT_SLICE_S, remaining_s)))
            self._check_abort()
            if not ready and remaining_s > WAIT_SLICE_S:
                continue
            if not ready:
                ranks = sorted(pending.values())
                waited_s = time.monotonic() - started
                raise ReplicaTimeout(f"{what} did not finish within {waited_s:.1f} s: {self.diagnose(ranks)}",
                                     ranks=ranks, step=step)
            rank = pending.pop(ready[0])
            try:
                results[rank] = ray.get(ready[0])
            except ray.exceptions.RayActorError as err:
                raise ReplicaError(f"{self.name([rank])} died during {what}: {_first_line(err)}",
                                   ranks=[rank], step=step) from err
            except ray.exceptions.RayTaskError as err:
                cause = f"{type(err.cause).__name__}: {_first_line(err.cause)}"
                # A peer's death breaks the collective of the ranks still alive; blame the dead one.
                dead = self._dead_among(pending)
                if dead:
                    raise ReplicaError(f"{self.name(dead)} died during {what} (so {self.name([rank])} "
                                       f"failed: {cause})", ranks=dead, step=step) from err
                raise ReplicaError(f"{self.name([rank])} failed during {what}: {cause}",
                                   ranks=[rank], step=step) from err
        return results

    @staticmethod
    def _dead_among(pending: dict[ray.ObjectRef, int]) -> list[int]:
        """Ranks (of `pending`: ref -> rank) whose actor is found dead within DEAD_PEER_GRACE_S."""
        if not pending:
            return []
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=DEAD_PEER_GRACE_S)
        dead = []
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                dead.append(pending[ref])
            except ray.exceptions.RayError:
                pass
        return sorted(dead)

    def diagnose(self, late_ranks: list[int]) -> str:
        """Name the ranks holding the others up: those that do not answer a probe, else those
        of `late_ranks` furthest behind (the rest are waiting for them in a collective)."""
        probes = self.call("position")
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=PROBE_TIMEOUT_S)
        positions: dict[int, Position] = {}
        for rank, ref in enumerate(probes):
            if ref in ready:
                try:
                    positions[rank] = ray.get(ref)
                except ray.exceptions.RayError:
                    pass
        silent = [r for r in range(len(probes)) if r not in positions]
        if silent:
            return f"{self.name(silent)} did not answer a probe (stopped, frozen or gone)"
        behind = min(positions[r].progress() for r in late_ranks)
        stuck = [r for r in late_ranks if positions[r].progress() == behind]
        where = positions[stuck[0]]
        waiting = "" if len(stuck) == len(positions) else "; the other ranks are waiting further on"
        return f"{self.name(stuck)} stuck at step {where.step} in {where.phase}{waiting}"

    # ---- stop --------------------------------------------------------------------------------
    def stop(self, *, orderly: bool = False) -> None:
        """Kill the replicas and free their placement group; safe to call twice. `orderly`
        (after a run that went well) first lets them close their data loaders, for up to
        CLOSE_TIMEOUT_S.

        Killing, not a polite leave of the process group: after a failure a peer may be
        stuck inside a collective, and a polite leave would wait for it."""
        self._stopped.set()
        if orderly and self._replicas:
            ray.wait(self.call("close"), num_returns=len(self._replicas), timeout=CLOSE_TIMEOUT_S)
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
