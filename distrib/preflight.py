"""What is checked before Ray starts and before a run directory is made: each failure is a
one-line ConfigError (exit 2) within a second, instead of an error after start-up or a
wait of start_timeout_s for what can never come.

- paths: the image folders (folders.py), run_dir's kind, the weights file;
- a fixed cluster that cannot hold the group: a local Ray instance (no RAY_ADDRESS) has
  this machine's CPUs and GPUs and no autoscaler, so placement would wait in vain.
  A cluster joined by address may have an autoscaler: there the driver waits, saying
  what it waits for.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from distrib import folders
from distrib.config import RunConfig
from distrib.errors import ConfigError


def check(cfg: RunConfig, *, local: bool) -> None:
    """Raise ConfigError for what this run can never do; `local`: the run starts its own local
    Ray instance (no address given, none in $RAY_ADDRESS, none running in this process)."""
    folders.check(cfg)
    _check_run_dir(cfg.run_dir)
    if cfg.weights not in ("none", "DEFAULT") and not Path(cfg.weights).is_file():
        raise ConfigError(f"weights: {cfg.weights!r} is invalid: no such file; give a .pth/.pt state dict, "
                          "DEFAULT or none")
    if local:
        _check_local_fit(cfg)


def _check_run_dir(run_dir: str) -> None:
    """The run directory, or the first of its parents that exists, must be a directory."""
    path = Path(run_dir.replace("{time}", "time"))
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise ConfigError(f"run_dir: {run_dir!r} is invalid: {str(existing)!r} is a file, not a directory; "
                                  "choose another run_dir")
            if not os.access(existing, os.W_OK):
                raise ConfigError(f"run_dir: {run_dir!r} is invalid: {str(existing)!r} is not writable; "
                                  "choose another run_dir")
            return


def local_gpus() -> int | None:
    """NVIDIA GPUs this machine shows (the driver's /proc entries, within CUDA_VISIBLE_DEVICES);
    0 with no NVIDIA driver and no nvidia-smi; None when it cannot tell."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if not gpus.is_dir():
        return 0 if shutil.which("nvidia-smi") is None else None
    count = len(list(gpus.iterdir()))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip() not in ("", "-1")]))
    return count


def _check_local_fit(cfg: RunConfig) -> None:
    replicas = cfg.num_workers + cfg.spare_workers
    spares = f" (with {cfg.spare_workers} spare)" if cfg.spare_workers else ""
    cpus = os.cpu_count() or 1
    if replicas * cfg.cpus_per_worker > cpus:
        raise ConfigError(f"num_workers: {replicas} workers{spares} x {cfg.cpus_per_worker:g} CPU need "
                          f"{replicas * cfg.cpus_per_worker:g} CPUs; this machine has {cpus} (a local Ray instance): "
                          "lower num_workers or cpus_per_worker, or join a cluster (RAY_ADDRESS)")
    gpus = local_gpus() if cfg.device == "cuda" else None
    # Ray never splits a replica over GPUs: floor(1 / share) replicas fit on each.
    needed = math.ceil(replicas / math.floor(1 / cfg.gpus_per_worker + 1e-9))
    if gpus is not None and needed > gpus:
        share = f" at {cfg.gpus_per_worker:g} per worker" if cfg.gpus_per_worker < 1 else ""
        raise ConfigError(f"device: cuda needs {needed} GPUs{spares}{share}; "
                          f"this machine has {gpus} (a local Ray instance): use device: auto or cpu, share GPUs "
                          "(gpus_per_worker: 0.5), or join a cluster with GPUs (RAY_ADDRESS)")
