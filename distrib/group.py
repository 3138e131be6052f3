"""ReplicaGroup: the Ray side of a run. Places, starts, connects, waits on and stops replicas.

    group = ReplicaGroup(cfg, say=print)       # cfg resolved: no `auto` left
    group.start(weights=ref, snapshot=None, first_step=0, faults=[])
    refs = group.call("run_steps", 0, 1)        # one call per rank, index = world rank
    records = group.wait(refs, "step 0", timeout_s=30.0, step=0)
    group.replace([1])                          # a lost rank: a hot spare, or a fresh actor
    group.reform(state=ref, first_step=1, needs_state=[1], faults=[])
    group.stop()

It knows nothing of steps, snapshots or files: the driver hands it what to call and
how long to wait. Every wait has a timeout, and every failure it raises names the
rank, its node and pid (blame.py: a dead replica is blamed rather than the peers whose
collective broke with it, and on a timeout a probe on each replica's own thread
names the one holding the others up). While a wait goes on for more than a second,
the same probes watch for a rank that stalls while its peers have moved on (stall.py).

Placement: one bundle per rank and one per hot spare (`spare_workers`). A spare is
an actor with its model built, waiting outside the process group; it takes the
bundle of no rank until it replaces one, and a new spare is then started in the
bundle the lost rank left.

Elastic (`min_workers`): a replacement that is not ready within `elastic_wait_s` of a
heal (its bundle waits for a node) is left out: the group goes on with fewer ranks, each
training on several of the num_workers logical shards of every global batch (`shards_of`),
and the actor joins (`grow`) once Ray has placed and started it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distrib import blame, warm
from distrib.cluster import DrainWatch, end_actors, kill_actors, place_bundles
from distrib.config import RunConfig
from distrib.errors import ReplicaError, ReplicaTimeout
from distrib.faults import Fault
from distrib.protocol import NodeInfo, shards_of
from distrib.replica import CONCURRENCY_GROUPS, Replica
from distrib.simreplica import SimReplica
from distrib.spares import SparePool
from distrib.stall import StallProbes

log = logging.getLogger(__name__)

RESULT_SLICE_S = 0.05
"""A wait on a call's results returns after this long with those in by then (see wait)."""
WAIT_SLICE_S = 0.5
"""Waits on replicas are cut into slices this long, and `check_abort` runs between them: a
signal handler must not raise inside ray.wait (Ray turns that into a SystemError), so it
only sets a flag, which takes effect within a slice."""
CLOSE_TIMEOUT_S = 2.0
"""How long an orderly stop waits for the replicas to close their data loaders."""
UNREAD_READ_AT = 1000
"""Refs held for the group's stop past which those done are read at once (read_at_stop)."""


class ReplicaGroup:
    """One placement group of Replica actors and hot spares; start once, stop once.

    A heal replaces lost ranks in place (`replace`, then `reform`); a full restart replaces
    the whole object. `stop` is idempotent and safe after a failed `start`.
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
        self.check_abort = check_abort
        """Raises to abandon a wait (a second stop signal); run between the slices of every wait."""
        self._wait_deadline = wait_deadline
        self._placement = None
        self._actor_class = None
        self._replicas: list = []
        self._bundles: list[int] = []
        """Placement-group bundle of each rank."""
        self._spares = SparePool(self._start_spare)
        self._unread: list[ray.ObjectRef] = []
        self._starting: dict[int, ray.ObjectRef] = {}
        """Rank -> the `prepare` call of its fresh replacement, until wait_replaced."""
        self._new_ranks: set[int] = set()
        self._joining: list[tuple] = []
        """(actor, bundle, its `prepare` call) of each replacement left out of a shrunk group."""
        self._weights: ray.ObjectRef | None = None
        self._nodes: list[NodeInfo] = []
        self._drains = DrainWatch(lambda: {n.node_id for n in self._nodes})

    @property
    def replicas(self) -> list:
        """The actor handles, index = world rank (empty before start and after stop)."""
        return list(self._replicas)

    @property
    def world_size(self) -> int:
        """Ranks in the group now: num_workers, or fewer while shrunk (min_workers)."""
        return len(self._replicas)

    @property
    def nodes(self) -> list[NodeInfo]:
        """Where each rank runs, index = world rank (kept after stop, to name the lost)."""
        return list(self._nodes)

    # ---- start -------------------------------------------------------------------------------
    def start(self, *, weights: ray.ObjectRef, snapshot: ray.ObjectRef | None, first_step: int,
              faults: list[Fault]) -> None:
        """Reserve the bundles, start one replica in each (ranks first, then spares), rendezvous,
        and set every rank up with `weights` and, if given, `snapshot` (taken after `first_step`
        steps). Spares build their models meanwhile; the group does not wait for them."""
        cfg = self.cfg
        self._weights = weights
        kept = warm.take(cfg)  # a finished run's actors, reset (warm.py): no placement, no start-up
        if kept is not None:
            self._placement, self._replicas, self._bundles = kept.placement, kept.replicas, kept.bundles
            self._actor_class = kept.actor_class
        else:
            self._placement = place_bundles(self.cfg, say=self._say, check_abort=self.check_abort)
            self._replicas = [self._new_actor(bundle) for bundle in range(cfg.num_workers)]
            self._bundles = list(range(cfg.num_workers))
        for bundle in range(cfg.num_workers, cfg.num_workers + cfg.spare_workers):
            self._spares.add(bundle)
        self._nodes = self.wait(self.call("node_info"), "start-up", cfg.start_timeout_s)
        self.wait(self.call("prepare", cfg, weights=weights), "model set-up", cfg.start_timeout_s)
        self.reform(state=snapshot, first_step=first_step, needs_state=list(range(cfg.num_workers)),
                    faults=faults)
        log.info("%d replicas on %s, %s/%s", cfg.num_workers, sorted({n.node for n in self._nodes}),
                 cfg.device, cfg.backend)
        self._drains.start()

    def _new_actor(self, bundle: int):
        cfg = self.cfg
        if self._actor_class is None:  # once: Ray exports a class each time ray.remote makes one
            self._actor_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(
                SimReplica if cfg.simulate_step_ms else Replica)
        return self._actor_class.options(
            num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker if cfg.device == "cuda" else 0, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement, placement_group_bundle_index=bundle),
        ).remote()

    def _start_spare(self, bundle: int) -> tuple:
        actor = self._new_actor(bundle)
        return actor, actor.prepare.remote(self.cfg, weights=self._weights)

    def reform(self, *, state: ray.ObjectRef | None, first_step: int, needs_state: list[int],
               faults: list[Fault]) -> None:
        """Form a new process group of the current ranks: rendezvous on rank 0, then every rank
        joins at once. The ranks in `needs_state` first load `state` (a snapshot after
        `first_step` steps; None: they hold the start-up state already) and get `faults`; the
        others keep their state and faults."""
        cfg = self.cfg
        master_addr, master_port = self.wait([self._replicas[0].rendezvous_address.remote()], "rendezvous",
                                             cfg.start_timeout_s)[0]
        shards = shards_of(cfg.num_workers, self.world_size)
        # Every rank's join must be in flight at once: each blocks until all have joined.
        refs = [replica.join.remote(world_rank=rank, world_size=self.world_size, shards=shards[rank],
                                    master_addr=master_addr,
                                    master_port=master_port, snapshot=state if rank in needs_state else None,
                                    first_step=first_step, faults=faults if rank in needs_state else None)
                for rank, replica in enumerate(self._replicas)]
        self.wait(refs, "process-group set-up", cfg.start_timeout_s)

    def replace(self, ranks: list[int]) -> dict[int, str]:
        """Kill `ranks` (lost or stuck) and put a new actor in each place: a ready hot spare, else a
        fresh actor in the lost rank's bundle (Ray re-places a bundle whose node is gone), whose
        start goes on meanwhile: `wait_replaced` waits for it. A used spare's bundle gets a new
        spare in replenish_spares. Returns rank -> 'spare' or 'fresh'."""
        self.kill(ranks)
        self._new_ranks.update(ranks)
        how = {}
        lost_nodes = {self._nodes[r].node_id for r in ranks if r < len(self._nodes)}
        for rank in ranks:
            spare = self._spares.take(avoid_nodes=lost_nodes)
            if spare is not None:
                self._spares.refill_later(self._bundles[rank])
                self._replicas[rank], self._bundles[rank] = spare
                how[rank] = "spare"
            else:
                self._replicas[rank] = self._new_actor(self._bundles[rank])
                self._starting[rank] = self._replicas[rank].prepare.remote(self.cfg, weights=self._weights)
                how[rank] = "fresh"
        return how

    def wait_replaced(self) -> list[int]:
        """Wait until every replacement has its model built, and learn where each runs.

        Elastic (min_workers): a fresh replacement not ready within elastic_wait_s is left out
        while min_workers ranks remain; its rank leaves the group (those above it move down) and
        the actor joins later (ready_to_grow, grow). Returns the ranks left out, as numbered before."""
        late = self._leave_out_late() if self.cfg.elastic and self._starting else []
        done = ray.put(None)  # for the other ranks: one ref per rank keeps index = rank
        self.wait([self._starting.pop(rank, done) for rank in range(len(self._replicas))],
                  "a new replica's set-up", self.cfg.start_timeout_s)
        new, self._new_ranks = self._new_ranks, set()
        infos = self.wait([r.node_info.remote() if rank in new else done for rank, r in enumerate(self._replicas)],
                          "start-up", self.cfg.start_timeout_s)
        self._nodes = [info if rank in new else node for rank, (info, node) in enumerate(zip(infos, self._nodes))]
        return late

    def _leave_out_late(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.elastic_wait_s
        refs = list(self._starting.values())
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs),
                                timeout=max(0.0, min(WAIT_SLICE_S, deadline - time.monotonic())))
            if len(ready) == len(refs) or time.monotonic() >= self._capped(deadline):
                break
            self.check_abort()
        late = sorted(rank for rank, ref in self._starting.items() if ref not in ready)
        if not late or self.world_size - len(late) < self.cfg.min_workers:
            return []
        for rank in reversed(late):
            self._joining.append((self._replicas.pop(rank), self._bundles.pop(rank), self._starting.pop(rank)))
            self._nodes.pop(rank)
        moved = lambda rank: rank - sum(gone < rank for gone in late)  # noqa: E731
        self._starting = {moved(rank): ref for rank, ref in self._starting.items()}
        self._new_ranks = {moved(rank) for rank in self._new_ranks if rank not in late}
        return late

    def ready_to_grow(self) -> bool:
        """Whether an actor left out of a shrunk group has started (no wait)."""
        return bool(self._joining) and bool(ray.wait([ref for *_, ref in self._joining], timeout=0)[0])

    def grow(self, *, state: ray.ObjectRef, first_step: int, faults: list[Fault]) -> list[int]:
        """Add the started actors left out of a shrunk group as new ranks (after the others),
        give them `state` (a snapshot after `first_step` steps, as every rank holds it) and
        `faults`, and form the larger group. One that failed to start is replaced by a fresh
        actor in its bundle, which joins later. Returns the new ranks."""
        ready = set(ray.wait([ref for *_, ref in self._joining], num_returns=len(self._joining), timeout=0)[0])
        new = []
        for entry in [e for e in self._joining if e[2] in ready]:
            self._joining.remove(entry)
            actor, bundle, prepared = entry
            try:
                ray.get(prepared)
            except ray.exceptions.RayError:  # it died starting: try again in the same bundle
                self._unread.append(prepared)
                ray.kill(actor, no_restart=True)  # one whose set-up raised lives on, holding the bundle
                fresh = self._new_actor(bundle)
                self._joining.append((fresh, bundle, fresh.prepare.remote(self.cfg, weights=self._weights)))
                continue
            new.append(self.world_size)
            self._replicas.append(actor)
            self._bundles.append(bundle)
        if new:
            self._nodes += self.wait([self._replicas[rank].node_info.remote() for rank in new], "start-up",
                                     self.cfg.start_timeout_s)
            self.reform(state=state, first_step=first_step, needs_state=new, faults=faults)
        return new

    def replenish_spares(self) -> None:
        """Start new spares in the bundles used spares left. The driver calls it once the first
        step after a heal has finished: a spare's start-up (torch's import, the model) would
        otherwise compete with that step for the node's CPUs."""
        self._spares.replenish()

    def wait_ready(self, ref: ray.ObjectRef, what: str, timeout_s: float) -> bool:
        """Wait for `ref` to be ready without fetching it (a snapshot on its way to other
        replicas), in slices, like every wait; returns whether it became ready in time."""
        deadline = time.monotonic() + timeout_s
        while not ray.wait([ref], timeout=WAIT_SLICE_S)[0]:
            self.check_abort()
            if time.monotonic() >= self._capped(deadline):
                return False
        return True

    def _capped(self, deadline: float) -> float:
        """`deadline`, or a stop's grace if that ends first (it may begin during a wait)."""
        return min(deadline, self._wait_deadline() or deadline)

    def read_at_stop(self, refs: list) -> None:
        """Hold `refs` (calls of lost ranks, probes still out) and read them when the group stops,
        not now; past UNREAD_READ_AT, those done are read now (a long run's stall probes)."""
        self._unread += refs
        if len(self._unread) >= UNREAD_READ_AT:
            self._unread = list(self.consume(self._unread, 0.0)[0])

    def kill(self, ranks: list[int]) -> None:
        """Kill the actors of `ranks` (already dead ones are skipped): their peers' collectives
        with them fail at once, as their connections close."""
        kill_actors([self._replicas[rank] for rank in ranks])

    def consume(self, refs: list, timeout_s: float) -> tuple[set, set]:
        """Wait up to `timeout_s` for `refs` (calls queued behind a failure) and take their
        results or errors, so that Ray prints no traceback for errors nobody read. Returns
        the refs that did not finish, and those whose actor died."""
        refs = [ref for ref in refs if ref is not None]
        if not refs:
            return set(), set()
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        dead = set()
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                dead.add(ref)
            except ray.exceptions.RayError:
                pass
        return set(pending), dead

    def draining_ranks(self) -> dict[int, int]:
        """Ranks on nodes that Ray is draining -> the drain's deadline (ms since the epoch, 0: none)."""
        draining = self._drains.draining
        if not draining:
            return {}
        return {rank: draining[n.node_id] for rank, n in enumerate(self._nodes) if n.node_id in draining}

    def drain_error(self, *, step: int) -> ReplicaError:
        """The ReplicaError that moves the group off the nodes being drained (see draining_ranks)."""
        ranks = self.draining_ranks()
        deadlines = [d for d in ranks.values() if d]
        notice = f", {min(deadlines) / 1e3 - time.time():.0f} s before its deadline" if deadlines else ""
        nodes = sorted({self._nodes[r].node_id for r in ranks})  # the cause: another drain is another failure
        return ReplicaError(f"{self.name(sorted(ranks))}: node being drained by Ray (a preemption notice){notice}",
                            ranks=sorted(ranks), step=step, cause=f"nodes drained: {nodes}")

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

    def wait(self, refs: list[ray.ObjectRef], what: str, timeout_s: float, *, step: int | None = None,
             stall_after_s: float | None = None) -> list:
        """Results of one call per rank (refs[i] is rank i's), failing fast on the first error.

        Raises ReplicaTimeout (with a diagnosis of who holds the others up) when not all finish
        within `timeout_s`, or as soon as a rank has stalled for `stall_after_s` while its peers
        moved on (None: no stall watch); and ReplicaError naming the dead or failed rank
        otherwise. `step` is carried on the error for the caller's recovery policy.
        """
        pending = {ref: rank for rank, ref in enumerate(refs)}
        started = last_result = time.monotonic()
        watch = StallProbes(self, stall_after_s, started) if stall_after_s else None
        results: list = [None] * len(refs)
        try:
            while pending:
                remaining_s = self._capped(started + timeout_s) - time.monotonic()
                # In batches: the wait returns when all are in, or after a short slice with those in
                # by then (a failed call among them is seen within the slice): a few waits and gets
                # per call, not one of each per rank, which at 128 ranks cost the driver ~10%.
                ready, _ = ray.wait(list(pending), num_returns=len(pending),
                                    timeout=max(0.0, min(RESULT_SLICE_S, remaining_s)))
                self.check_abort()
                if not ready and watch is not None and time.monotonic() - last_result >= WAIT_SLICE_S:
                    watch.poll(what, step)
                if not ready and remaining_s > RESULT_SLICE_S:
                    continue
                if not ready:
                    waited_s = time.monotonic() - started
                    text, stuck = blame.diagnose(self, sorted(pending.values()))
                    raise ReplicaTimeout(f"{what} did not finish within {waited_s:.1f} s: {text}", ranks=stuck,
                                         step=step, cause=f"{what} did not finish: stuck")
                last_result = time.monotonic()
                try:
                    values = ray.get(ready)
                except ray.exceptions.RayError:
                    values = None
                for index, ref in enumerate(ready):
                    rank = pending.pop(ref)
                    try:
                        results[rank] = values[index] if values is not None else ray.get(ref)
                    except ray.exceptions.RayError as err:  # one of them failed: it is read alone
                        raise blame.blame(self, rank, err, pending, what, step) from err
            return results
        finally:
            if watch is not None:
                watch.close()

    # ---- stop --------------------------------------------------------------------------------
    def stop(self, *, orderly: bool = False) -> None:
        """Kill the replicas and free their placement group; safe to call twice. `orderly`
        (after a run that went well) first lets them close their data loaders and exit, for
        up to CLOSE_TIMEOUT_S each; inside warm.keep_warm it keeps a whole group instead.

        Killing, not a polite leave of the process group: after a failure a peer may be
        stuck inside a collective, and a polite leave would wait for it."""
        self._drains.stop()
        whole = not (self._joining or self._starting) and self.world_size == self.cfg.num_workers
        if orderly and whole and not self.draining_ranks() and warm.wanted(self.cfg):  # kept instead (warm.py)
            resets = self.call("reset")
            if warm.keep(warm.KeptGroup(warm.shape(self.cfg), self._placement, self._replicas, self._bundles,
                                        self._actor_class), resets):
                self._replicas, self._placement = [], None
            self._unread += resets  # read below: done, or late and read once their actors are gone
        to_kill = list(self._replicas)
        if orderly and self._replicas:
            ray.wait(self.call("close"), num_returns=len(self._replicas), timeout=CLOSE_TIMEOUT_S)
            end_actors(self._replicas, CLOSE_TIMEOUT_S)  # each exits, or is killed if it does not
            to_kill = []
        kill_actors(to_kill + self._spares.actors() + [actor for actor, *_ in self._joining])
        # Calls of lost ranks and probes nobody read: read now that every actor is gone, so Ray
        # prints no error for them.
        self.consume(self._unread + list(self._starting.values()) + self._spares.refs()
                     + [ref for *_, ref in self._joining], CLOSE_TIMEOUT_S)
        self._unread, self._starting, self._replicas, self._joining = [], {}, [], []
        self._spares.clear()
        if self._placement is not None:
            try:
                remove_placement_group(self._placement)
            except Exception:
                pass
            self._placement = None

