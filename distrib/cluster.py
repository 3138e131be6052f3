"""The Ray cluster a run uses: connecting to it, and what it has (GPUs, nodes being drained)."""

from __future__ import annotations

import logging
import os

import ray


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
