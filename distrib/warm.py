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

Kept at most one group at a time: a run of another shape releases it first (kills the
actors, removes the placement group) and starts its own. Leaving `keep_warm` releases it.
What it costs: the kept group holds its CPUs and GPUs (~0.3 GB of memory per replica, a
CUDA context) between runs, for as long as the block lasts. A run that failed (its
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
_kept: KeptGroup | None = None


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
    """Keep `group` for the next run of its shape (releasing any other) once each of its replicas'
    `resets` (Replica.reset) has finished well within RESET_TIMEOUT_S; False, keeping nothing, if
    one failed or is late (the caller then stops the group)."""
    global _kept
    done, late = ray.wait(resets, num_returns=len(resets), timeout=RESET_TIMEOUT_S)
    try:
        ray.get(done)
    except ray.exceptions.RayError as err:
        log.info("a replica could not be reset for the next run (%s): not kept", err)
        return False
    if late:
        return False
    release()
    _kept = group
    return True


def take(cfg: RunConfig) -> KeptGroup | None:
    """The kept group, if it has `cfg`'s shape and every actor answers; it is then no longer
    kept. Otherwise release what was kept (a run of another shape needs its resources), and
    None: the caller starts a group of its own."""
    global _kept
    kept, _kept = _kept, None
    if kept is None:
        return None
    try:
        if kept.shape == shape(cfg):
            pings = [replica.node_info.remote() for replica in kept.replicas]
            ready, _ = ray.wait(pings, num_returns=len(pings), timeout=PING_TIMEOUT_S)
            if len(ready) == len(pings):
                ray.get(pings)
                return kept
    except ray.exceptions.RayError as err:
        log.info("a kept replica is gone (%s): starting afresh", err)
    except BaseException:  # Ctrl-C in a notebook: no one would own the group otherwise
        _release(kept)
        raise
    _release(kept)
    return None


def release() -> None:
    """Kill the kept actors and free their placement group, if any are kept."""
    global _kept
    kept, _kept = _kept, None
    if kept is not None:
        _release(kept)


def _release(kept: KeptGroup) -> None:
    if not ray.is_initialized() or kept.shape[:3] != _session():
        return  # that connection to Ray ended, and its actors and placement group with it
    end_actors(kept.replicas, EXIT_TIMEOUT_S)
    try:
        remove_placement_group(kept.placement)
    except Exception:
        pass
