"""Warm replicas: a finished run's actors, kept for the next run of the same shape in this driver.

    with distrib.keep_warm():                    # a notebook, a sweep with repeats, a test module
        for lr in (0.1, 0.05, 0.02):
            with Orchestrator(cfg.replace(lr=lr, run_dir=f"runs/lr{lr}")) as orch:
                orch.train()                     # the 2nd and 3rd runs skip the replicas' start

A replica's start is mostly its process: Ray's worker, then torch's and torchvision's imports,
5-6 CPU-seconds each before its first step (2 replicas: 5.2-5.6 s of wall time on 2 cores).
Inside `keep_warm`, a run that ends well does not kill its replicas: each closes its data
loader, leaves the process group and drops its model (`Replica.reset`), and the actors and
their placement group are kept. The next run whose placement is the same (`shape`) takes
them and sets them up as a fresh start would: a new model from its own config, a new
process group, the same consistency check. Numbers do not depend on it: every run builds
all of its state from its config (the bit-identity tests run on kept actors).

Up to MAX_KEPT_GROUPS groups of different shapes are kept, so that runs alternating between
two shapes (a 1-worker reference and its N-worker run) both start warm. A kept group of another
shape stays while the cluster has room for the run at hand. Every kept group is released
(actors ended, placement group removed) to give its resources back when a run's bundles cannot
be placed at once for want of free resources (cluster.place_bundles' `make_room`), and when a
run fails and recovers (a replacement, a grow-back or a spare's refill may need them:
recovery_policy). A third shape releases the group used longest ago. Leaving `keep_warm`
releases them all. What it costs: a kept group holds its
CPUs and GPUs (~0.3 GB of memory per replica, a CUDA context) between runs, for as long as
the block lasts. A run that failed (its
Orchestrator shut down without `orderly`), or ended in a shrunk group, keeps nothing; nor
does a group with hot spares, or of simulated replicas.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray.util.placement_group import remove_placement_group

from distrib.cluster import end_actors
from distrib.config import RunConfig

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 10.0
"""How long a kept actor may take to answer before its group is released and started afresh."""
RESET_TIMEOUT_S = 10.0
"""How long a replica's reset (loader closed, group left, model freed) may take on a busy machine."""
EXIT_TIMEOUT_S = 2.0
"""How long a released actor has to exit on its own before it is killed."""
MAX_KEPT_GROUPS = 2
"""Groups of different shapes kept at once; keeping one more releases the one used longest ago."""


def _session() -> tuple:
    """This driver's connection to Ray: a new `ray.init` may reuse the old one's address."""
    context = ray.get_runtime_context()
    return context.gcs_address, context.get_node_id(), context.get_job_id()


def shape(cfg: RunConfig) -> tuple:
    """What a group's placement and actors depend on: runs with the same shape can share them.
    On a GPU, `deterministic` too: cuBLAS reads CUBLAS_WORKSPACE_CONFIG once per process."""
    cuda = cfg.device == "cuda"
    return (*_session(), cfg.num_workers, cfg.spare_workers, cfg.cpus_per_worker, cfg.device,
            cfg.gpus_per_worker if cuda else 0, cuda and cfg.deterministic, cfg.placement_strategy,
            bool(cfg.simulate_step_ms))


@dataclass
class KeptGroup:
    """A finished run's actors (index = world rank), their bundles and placement group."""
    shape: tuple
    placement: object
    replicas: list
    bundles: list[int]
    actor_class: object


_enabled = False
_kept: list[KeptGroup] = []
"""The kept groups, the one kept last at the end."""


@contextmanager
def keep_warm(enabled: bool = True) -> Iterator[None]:
    """Within the block, a run that ends well keeps its replicas for the next run of the same
    shape in this process. `keep_warm(False)` turns it off inside an outer block (and
    releases what was kept). On leaving, the setting before it returns, and what was kept is
    released unless that setting keeps it."""
    global _enabled
    before, _enabled = _enabled, enabled
    if not enabled:
        release()
    try:
        yield
    finally:
        _enabled = before
        if not before:
            release()


def wanted(cfg: RunConfig) -> bool:
    """Whether a group of `cfg` that ended well is to be kept now: inside keep_warm, and with
    no hot spares or simulated replicas."""
    return _enabled and not cfg.spare_workers and not cfg.simulate_step_ms


def keep(group: KeptGroup, resets: list[ray.ObjectRef]) -> bool:
    """Keep `group` for the next run of its shape once each of its replicas' `resets`
    (Replica.reset) has finished well within RESET_TIMEOUT_S (past MAX_KEPT_GROUPS, the group
    used longest ago is released); False, keeping nothing, if one failed or is late (the caller
    then stops the group)."""
    done, late = ray.wait(resets, num_returns=len(resets), timeout=RESET_TIMEOUT_S)
    try:
        ray.get(done)
    except ray.exceptions.RayError as err:
        log.info("a replica could not be reset for the next run (%s): not kept", err)
        return False
    if late:
        return False
    for same in [g for g in _kept if g.shape == group.shape]:  # two runs of one shape ended: keep the last
        _kept.remove(same)
        _release(same)
    _kept.append(group)
    while len(_kept) > MAX_KEPT_GROUPS:
        _release(_kept.pop(0))
    return True


def take(cfg: RunConfig) -> KeptGroup | None:
    """The kept group of `cfg`'s shape, if there is one and every actor answers; it is then no
    longer kept. Otherwise None: the caller places a group of its own (and, if its bundles
    cannot be placed at once, releases the others: `release` as place_bundles' make_room)."""
    wanted_shape = shape(cfg)
    for kept in [g for g in _kept if g.shape[:3] != wanted_shape[:3]]:  # of an ended Ray connection
        _kept.remove(kept)
    matching = [g for g in _kept if g.shape == wanted_shape]
    if not matching:
        return None
    kept = matching[0]
    _kept.remove(kept)
    pings = [replica.node_info.remote() for replica in kept.replicas]
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=PING_TIMEOUT_S)
    try:
        if len(ready) == len(pings):
            ray.get(pings)
            return kept
    except ray.exceptions.RayError as err:
        log.info("a kept replica is gone (%s): starting afresh", err)
    _release(kept)
    return None


def release() -> None:
    """End the kept actors and free their placement groups, if any are kept."""
    while _kept:
        _release(_kept.pop())


def _release(kept: KeptGroup) -> None:
    if not ray.is_initialized() or kept.shape[:3] != _session():
        return  # that connection to Ray ended, and its actors and placement group with it
    end_actors(kept.replicas, EXIT_TIMEOUT_S)
    try:
        remove_placement_group(kept.placement)
    except Exception:
        pass
