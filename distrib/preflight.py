"""What is checked before Ray starts and before a run directory is made: each failure is a
one-line ConfigError (exit 2) within a second, instead of an error after start-up or a
wait of start_timeout_s for what can never come.

- paths: the image folders (folders.py), run_dir's kind, the weights file;
- a run_dir URI (storage.py): its scheme, S3 credentials, that its bucket exists;
- a fixed cluster that cannot hold the group: a local Ray instance (no RAY_ADDRESS) has
  this machine's CPUs and GPUs and no autoscaler, so placement would wait in vain.

A cluster joined by address is checked once connected, before the group is placed
(check_cluster_fit): without an autoscaler it is as fixed as a local instance; with one
(or where Ray cannot tell) the driver waits, saying what it waits for.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from distrib import folders, rundir, storage
from distrib.config import RunConfig
from distrib.errors import ConfigError


def check(cfg: RunConfig, *, local: bool, new_run: bool = True) -> None:
    """Raise ConfigError for what this run can never do; `local`: the run starts its own local
    Ray instance (no address given, none in $RAY_ADDRESS, none running in this process);
    `new_run`: run_dir must take a new run (False for a resume)."""
    folders.check(cfg)
    _check_run_dir(cfg, new_run=new_run)
    if cfg.weights not in ("none", "DEFAULT") and not Path(cfg.weights).is_file():
        raise ConfigError(f"weights: {cfg.weights!r} is invalid: no such file; give a .pth/.pt state dict, "
                          "DEFAULT or none")
    if local:
        _check_local_fit(cfg)


def _check_run_dir(cfg: RunConfig, *, new_run: bool) -> None:
    """A URI: its store must be writable (storage.check_writable). A local path: the run
    directory, or the first of its parents that exists, must be a directory. A new run's
    directory, unless `{time}` names a new one, must not hold a run's files (rundir.check_new)."""
    run_dir = cfg.run_dir
    if storage.is_uri(run_dir):
        storage.check_writable(run_dir.replace("{time}", "time"))
    elif problem := unwritable(Path(run_dir.replace("{time}", "time"))):
        raise ConfigError(f"run_dir: {run_dir!r} is invalid: {problem}; choose another run_dir")
    if new_run and "{time}" not in run_dir:
        rundir.check_new(storage.locate(run_dir.format()))  # {{ and }} are literal braces


def unwritable(path: Path) -> str | None:
    """Why `path` cannot be a folder this process writes to, or None if it is one or can be made:
    the first of it and its parents that exists must be a writable directory."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                return f"{str(existing)!r} is a file, not a folder"
            return None if os.access(existing, os.W_OK | os.X_OK) else f"{str(existing)!r} is not writable"
    return None


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
    if cfg.device == "auto" and local_gpus() == 0:  # auto is cpu here: the rules of a CPU run apply
        try:
            cfg.replace(device="cpu")
        except ConfigError as err:
            raise ConfigError(f"{err} (device: auto is cpu: this machine has no GPU)") from None
    replicas = cfg.num_workers + cfg.spare_workers
    spares = f" (with {cfg.spare_workers} spare)" if cfg.spare_workers else ""
    cpus = os.cpu_count() or 1
    if replicas * cfg.cpus_per_worker > cpus:
        raise ConfigError(f"num_workers: {replicas} workers{spares} x {cfg.cpus_per_worker:g} CPU need "
                          f"{replicas * cfg.cpus_per_worker:g} CPUs; this machine has {cpus} (a local Ray instance): "
                          "lower num_workers or cpus_per_worker, or join a cluster (RAY_ADDRESS)")
    if cfg.placement_strategy == "STRICT_SPREAD" and replicas > 1:  # else a wait of start_timeout_s for nodes
        raise ConfigError(f"placement_strategy: STRICT_SPREAD puts each of the {replicas} workers{spares} on a node "
                          "of its own, and a local Ray instance is one node: use PACK or SPREAD, or join a "
                          "cluster (RAY_ADDRESS)")
    gpus = local_gpus() if cfg.device == "cuda" else None
    # Ray never splits a replica over GPUs: floor(1 / share) replicas fit on each.
    needed = math.ceil(replicas / math.floor(1 / cfg.gpus_per_worker + 1e-9))
    if gpus is not None and needed > gpus:
        share = f" at {cfg.gpus_per_worker:g} per worker" if cfg.gpus_per_worker < 1 else ""
        raise ConfigError(f"device: cuda needs {_count(needed, 'GPU')}{spares}{share}; "
                          f"this machine has {gpus} (a local Ray instance): use device: auto or cpu, share GPUs "
                          "(gpus_per_worker: 0.5), or join a cluster with GPUs (RAY_ADDRESS)")


def check_cluster_fit(cfg: RunConfig) -> None:
    """Raise ConfigError where the connected cluster has no autoscaler and can never hold the
    group (workers and spares, one bundle each), instead of a wait of start_timeout_s. `cfg` is
    resolved (device cpu or cuda). Call it once connected to Ray, before placing the group."""
    import ray

    from distrib.cluster import has_autoscaler

    if has_autoscaler():
        return
    nodes = [(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n["Alive"]]
    replicas = cfg.num_workers + cfg.spare_workers
    spares = f" (with {cfg.spare_workers} spare)" if cfg.spare_workers else ""
    cuda = cfg.device == "cuda"
    where = "this cluster (no autoscaler)"
    # Ray never splits a bundle over nodes, nor a replica over GPUs: floor(1 / share) fit on a GPU.
    per_gpu = math.floor(1 / cfg.gpus_per_worker + 1e-9)
    gpus = sum(math.floor(node_gpus + 1e-9) for _, node_gpus in nodes)
    needed = math.ceil(replicas / per_gpu)
    if cuda and needed > gpus:
        share = f" at {cfg.gpus_per_worker:g} per worker" if cfg.gpus_per_worker < 1 else ""
        raise ConfigError(f"device: cuda needs {_count(needed, 'GPU')}{spares}{share}; {where} has {gpus}: "
                          "use device: auto or cpu, share GPUs (gpus_per_worker: 0.5), or add nodes with GPUs")
    fits = [_workers_on(node_cpus, node_gpus if cuda else None, cfg.cpus_per_worker, per_gpu)
            for node_cpus, node_gpus in nodes]
    if max(fits, default=0) == 0:
        kind = " GPU" if cuda else ""
        largest = max((node_cpus for node_cpus, node_gpus in nodes if node_gpus >= 1 or not cuda), default=0)
        raise ConfigError(f"cpus_per_worker: one worker needs {_count(cfg.cpus_per_worker, 'CPU')} on one{kind} node; "
                          f"the largest{kind} node of {where} has {largest:g}: lower cpus_per_worker, "
                          "or add a bigger node")
    cpus = sum(node_cpus for node_cpus, _ in nodes)
    if replicas * cfg.cpus_per_worker > cpus:
        raise ConfigError(f"num_workers: {replicas} workers{spares} x {cfg.cpus_per_worker:g} CPU need "
                          f"{_count(replicas * cfg.cpus_per_worker, 'CPU')}; {where} has {cpus:g}: "
                          "lower num_workers or cpus_per_worker, or add nodes")
    # Enough in total, yet whole bundles per node, as the strategy allows, may still be too few.
    room = {"STRICT_PACK": max(fits), "STRICT_SPREAD": sum(1 for n in fits if n)}.get(cfg.placement_strategy, sum(fits))
    if room < replicas:
        strict = ", use placement_strategy: PACK" if cfg.placement_strategy.startswith("STRICT") else ""
        raise ConfigError(f"num_workers: {replicas} workers{spares} x {cfg.cpus_per_worker:g} CPU "
                          f"({cfg.placement_strategy}) need {replicas} places; the nodes of {where} have {room}: "
                          f"lower num_workers or cpus_per_worker{strict}, or add nodes")


def _workers_on(node_cpus: float, node_gpus: float | None, cpus_per_worker: float, per_gpu: int) -> int:
    """Replicas one node can hold; `node_gpus` None: CPU replicas, which need no GPU."""
    workers = math.floor(node_cpus / cpus_per_worker + 1e-9)
    return workers if node_gpus is None else min(workers, math.floor(node_gpus + 1e-9) * per_gpu)


def _count(amount: float, unit: str) -> str:
    return f"{amount:g} {unit}" + ("" if amount == 1 else "s")
