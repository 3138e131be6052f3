"""Rendezvous, process-group set-up and teardown, and the one place the backend is chosen.

The rendezvous follows Ray Train: the driver asks rank 0 for its node address
and a free port, then every rank calls `init_process_group` at once and the
driver waits once, with a timeout. Initialising ranks one at a time deadlocks,
because each rank's init blocks until all ranks have joined.

torch is imported inside the functions that need it, so the driver can use
this module without paying torch's import time.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distrib.config import RunConfig

log = logging.getLogger(__name__)


def resolve_device(device: str, cluster_gpus: float) -> str:
    """`auto` -> cuda when the Ray cluster has GPUs, else cpu; explicit choices pass through."""
    if device != "auto":
        return device
    return "cuda" if cluster_gpus > 0 else "cpu"


def resolve_backend(backend: str, device: str, gpus_per_worker: float = 1.0) -> str:
    """`auto` -> nccl on cuda with a GPU per replica, else gloo (on cpu, and on cuda when
    replicas share a GPU: NCCL refuses two ranks on one device): the only place it is chosen."""
    if backend != "auto":
        return backend
    return "nccl" if device == "cuda" and gpus_per_worker >= 1 else "gloo"


def resolve_config(cfg: RunConfig, *, cluster_gpus: float) -> RunConfig:
    """`cfg` with every `auto` replaced by what this cluster gets: GPU speed settings on cuda, fp32 on cpu."""
    device = resolve_device(cfg.device, cluster_gpus)
    backend = resolve_backend(cfg.backend, device, cfg.gpus_per_worker)
    return cfg.replace(
        device=device,
        backend=backend,
        # Heals that shrink the group run on gloo only: where auto picks NCCL, min_workers has no effect.
        min_workers=cfg.min_workers if backend != "nccl" else 0,
        precision=cfg.precision if cfg.precision != "auto" else ("bf16" if device == "cuda" else "fp32"),
        decoder=cfg.decoder if cfg.decoder != "auto" else "torchvision",
        loader_workers=cfg.loader_workers if cfg.loader_workers != "auto" else max(1, int(cfg.cpus_per_worker) - 1),
    )


def node_address() -> str:
    """This node's address as Ray sees it (reachable by the other nodes of the cluster)."""
    import ray.util

    return ray.util.get_node_ip_address()


def free_port() -> int:
    """A TCP port that was free a moment ago on this node (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def init_process_group(*, backend: str, master_addr: str, master_port: int,
                       world_rank: int, world_size: int, timeout_s: float) -> None:
    """Join the process group. All ranks must call this at the same time.

    The address is passed as an init_method URL rather than through
    MASTER_ADDR/MASTER_PORT, so no environment variable is set behind the user's back.
    """
    import torch.distributed as dist

    log.info("rank %d/%d joining %s group at %s:%d", world_rank, world_size, backend, master_addr, master_port)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=world_rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def leave_process_group() -> None:
    """Leave the default process group if in one, closing its connections (gloo: peers blocked in
    a collective with this process fail at once). Errors of a group already broken are ignored."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # a broken group may fail its own teardown; it is gone either way
            log.warning("leaving the process group: %s", err)


def world_size() -> int:
    """The group's size, or 1 without a process group (so the maths runs in a plain process)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def host_name() -> str:
    return os.uname().nodename
