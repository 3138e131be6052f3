"""The Ray cluster a run uses: connecting to it, and what it has (GPUs, nodes being drained)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import ray

log = logging.getLogger(__name__)

DRAIN_POLL_S = 1.0
"""How often a DrainWatch asks Ray which nodes are being drained (a preemption notice)."""


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


class DrainWatch:
    """Polls Ray on a thread (no cost to the loop) for the nodes of `node_ids()` being drained."""

    def __init__(self, node_ids: Callable[[], set[str]]):
        self._node_ids = node_ids
        self._stopped = threading.Event()
        self.draining: dict[str, int] = {}
        """Node id -> the drain's deadline (ms since the epoch, 0: none), as of the last poll."""

    def start(self) -> None:
        threading.Thread(target=self._watch, name="drain-watch", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(DRAIN_POLL_S):
            try:
                drained = draining_nodes()
            except Exception as err:  # a GCS hiccup: try again at the next poll
                log.debug("drain poll failed: %s", err)
                continue
            node_ids = self._node_ids()
            self.draining = {node: deadline for node, deadline in drained.items() if node in node_ids}
