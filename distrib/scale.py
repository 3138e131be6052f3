"""`distrib scale`: scaling sweeps. Throughput, efficiency and where the time goes, per point.

    distrib scale --config configs/sweep-laptop.yaml                      # distrib only
    distrib scale --config configs/sweep-laptop.yaml --baseline torchrun  # and plain torchrun + DDP
    distrib scale --config configs/sweep-laptop.yaml --resume runs/sweep-X  # skip finished points

Each point starts a fresh group (resources reserved before any timing), runs
warm-up steps that are not counted, then timed steps, then a profile on the live
group: backward without all-reduce (what the overlap hides) and a plain all-reduce
of the gradient bytes (the microbenchmark). Rows go to OUT_DIR/results.jsonl as each
point finishes; scale_report.py rebuilds the tables and plots from them at the end.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distrib import comm, config
from distrib.config import RunConfig
from distrib.config_rules import only_time_field
from distrib.errors import ConfigError
from distrib.preflight import unwritable
from distrib.scale_report import add_efficiency, write_outputs

SWEEPABLE = ("num_workers", "batch_size_per_worker", "image_size", "precision", "bucket_cap_mb",
             "grad_compression", "placement_strategy")
"""Run-config keys a sweep may vary; num_workers must be among them."""

BASELINE_KEYS = ("num_workers", "batch_size_per_worker", "image_size")
"""What the torchrun baseline honours; it keeps its own defaults (fp32, DDP's, BatchNorm in
train mode) for the rest."""

SWEEP_BATCHNORM = "sync"
"""The batchnorm of a sweep's points unless its base sets one: with synchronized BatchNorm,
N workers train like 1 worker on the same global batch, so changing N changes only speed."""


def _fail(key: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"sweep {key}: {value!r} is invalid: {rule}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """A scaling sweep: a base run config and the values to sweep. Validated on construction."""

    base: RunConfig
    """The run config every point starts from (its steps, run_dir and checks are replaced)."""
    sweep: dict[str, tuple] = field(default_factory=dict)
    """Run-config key -> the values to try; the points are every combination."""
    scaling: Literal["weak", "strong"] = "weak"
    """`weak`: batch_size_per_worker fixed; `strong`: global_batch_size fixed, split over workers."""
    global_batch_size: int = 0
    """The fixed global batch of strong scaling (must divide by every num_workers)."""
    warmup_steps: int = 3
    """Steps run before timing (cuDNN/oneDNN choices, allocator, first-call costs)."""
    timed_steps: int = 10
    """Steps timed per point."""
    out_dir: str = "runs/sweep-{time}"
    """Where results and plots go; `{time}` becomes the start time."""
    target_top1: float = 0.0
    """Time to accuracy: each point trains until the held-out top-1 reaches this, evaluating
    every base.eval_every steps, or until base.steps (the cap); 0 = a throughput sweep."""

    def __post_init__(self) -> None:
        if isinstance(self.target_top1, bool) or not isinstance(self.target_top1, (int, float)):
            raise _fail("target_top1", self.target_top1, "must be a number in (0, 1], or 0 for a throughput sweep")
        if self.target_top1:
            self._check_target()
        if self.scaling not in ("weak", "strong"):
            raise _fail("scaling", self.scaling, "must be weak or strong")
        if self.scaling == "strong":
            self._check_strong()
        for key in ("warmup_steps", "timed_steps"):
            if not _positive_int(getattr(self, key)):
                raise _fail(key, getattr(self, key), "must be an integer >= 1")
        if isinstance(self.global_batch_size, bool) or not isinstance(self.global_batch_size, int):
            raise _fail("global_batch_size", self.global_batch_size, "must be an integer")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise _fail("out_dir", self.out_dir, "must be a non-empty path")
        if not only_time_field(self.out_dir):
            raise _fail("out_dir", self.out_dir,
                        "may hold {time} (the start time) and no other {...}; write {{ and }} for a literal brace")
        self._check_points()

    def _check_target(self) -> None:
        if not 0 < self.target_top1 <= 1:
            raise _fail("target_top1", self.target_top1, "must be in (0, 1]")
        if not self.base.eval_every:
            raise _fail("base.eval_every", self.base.eval_every,
                        "a time-to-accuracy sweep evaluates as it goes: set eval_every in base")

    def _check_strong(self) -> None:
        if "batch_size_per_worker" in self.sweep:
            raise _fail("sweep.batch_size_per_worker", self.sweep["batch_size_per_worker"],
                        "strong scaling derives it from global_batch_size; sweep one or the other")
        if not _positive_int(self.global_batch_size):
            raise _fail("global_batch_size", self.global_batch_size, "strong scaling needs a positive integer")
        for workers in self.sweep.get("num_workers", ()):
            if self.global_batch_size % workers:
                raise _fail("global_batch_size", self.global_batch_size,
                            f"must divide by every num_workers ({workers})")

    def _check_points(self) -> None:
        """Every point's run config, as its run will build it: a base that is valid for base.steps
        may not be for a throughput point's warmup_steps + timed_steps."""
        for point in self.points():
            try:
                self.run_config(point, run_dir=self.out_dir)
            except ConfigError as err:
                why = "" if self.target_top1 else (f"; a throughput point runs warmup_steps + timed_steps = "
                                                   f"{self.warmup_steps + self.timed_steps} steps, not base.steps: "
                                                   "raise timed_steps or change base")
                raise ConfigError(f"sweep point {_say_point(point)}: {err}{why}") from None

    def run_config(self, point: dict[str, Any], *, run_dir: str) -> RunConfig:
        """The run config of one of distrib's points, checks and checkpoints off so that the timed
        steps are training alone (a final check still runs): a throughput point runs warmup_steps +
        timed_steps; a time-to-accuracy point runs up to base.steps, checking as base says."""
        if self.target_top1:
            return self.base.replace(**point, run_dir=run_dir, checkpoint_every=0)
        return self.base.replace(**point, steps=self.warmup_steps + self.timed_steps, run_dir=run_dir,
                                 check_every=0, checkpoint_every=0)

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the swept values (num_workers varying fastest), as run-config changes."""
        keys = [k for k in self.sweep if k != "num_workers"] + ["num_workers"]
        points = []
        for values in itertools.product(*(self.sweep[k] for k in keys)):
            point = dict(zip(keys, values))
            if self.scaling == "strong":
                point["batch_size_per_worker"] = self.global_batch_size // point["num_workers"]
            points.append(point)
        return points


_SWEEP_KEYS = tuple(f.name for f in dataclasses.fields(SweepConfig))


def load_sweep(path: str | Path) -> SweepConfig:
    """A validated SweepConfig from YAML; ConfigError (one line) on any problem. Keys the file
    leaves out take SweepConfig's defaults."""
    raw = config.read_yaml(path, what="sweep YAML file")
    for key in raw:
        if key not in _SWEEP_KEYS:
            raise config.unknown_key(key, _SWEEP_KEYS, prefix="sweep ")
    base_values = raw.get("base") or {}
    if not isinstance(base_values, dict):
        raise _fail("base", base_values, "must be a mapping of run-config keys")
    try:
        base = config.from_dict({"batchnorm": SWEEP_BATCHNORM, **base_values})
    except ConfigError as err:
        raise ConfigError(f"sweep base.{err}") from None
    values = _swept_values(base, raw.get("sweep"))
    rest = {key: raw[key] for key in _SWEEP_KEYS if key in raw and key not in ("base", "sweep")}
    return SweepConfig(base=base, sweep=values, **rest)


def _swept_values(base: RunConfig, sweep: Any) -> dict[str, tuple]:
    """The `sweep:` mapping, each value checked against the run config's rules."""
    if not isinstance(sweep, dict) or "num_workers" not in sweep:
        raise _fail("sweep", sweep, "must be a mapping with at least num_workers: [1, 2, ...]")
    values: dict[str, tuple] = {}
    for key, options in sweep.items():
        if key not in SWEEPABLE:
            raise _fail(f"sweep.{key}", options, f"cannot be swept; sweepable: {', '.join(SWEEPABLE)}")
        if not isinstance(options, list) or not options:
            raise _fail(f"sweep.{key}", options, "must be a non-empty list of values")
        for option in options:
            try:
                base.replace(**{key: option})
            except ConfigError as err:
                raise ConfigError(f"sweep sweep.{err}") from None
        values[key] = tuple(options)
    return values


def point_id(tool: str, point: dict[str, Any]) -> str:
    return tool + "|" + "|".join(f"{k}={point[k]}" for k in sorted(point))


def _say_point(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


# ---- running points -----------------------------------------------------------------------------
def _busbw_gbps(num_bytes: int, seconds: float, workers: int) -> float | None:
    """All-reduce bus bandwidth (NCCL-tests' definition): bytes x 2(n-1)/n per second, in GB/s."""
    if workers < 2 or seconds <= 0 or num_bytes <= 0:
        return None
    return num_bytes * 2 * (workers - 1) / workers / seconds / 1e9


def run_to_target(sweep: SweepConfig, point: dict[str, Any], run_dir: Path) -> dict:
    """One time-to-accuracy point: train until the held-out top-1 reaches sweep.target_top1
    (evaluated every base.eval_every steps) or base.steps; the clock runs from the first step
    queued to the evaluation that reached it, evaluations included, as MLPerf counts it."""
    import ray
    import torch

    from distrib.driver import Orchestrator

    cfg = sweep.run_config(point, run_dir=str(run_dir))
    with Orchestrator(cfg, progress=False) as orch:
        started = time.time()
        reached = None
        while reached is None and orch.step_count < cfg.steps:
            orch.train(min(cfg.eval_every, cfg.steps - orch.step_count))
            if orch.evals[-1].top1 >= sweep.target_top1:
                reached = orch.evals[-1]
        summary, resolved, best = orch.summary(), orch.cfg, max(e.top1 for e in orch.evals)
    steps = reached.step + 1 if reached else None
    return {"images_per_s": summary["images_per_s"], "step_s": summary["step_s"], "target_top1": sweep.target_top1,
            "reached_target": reached is not None, "best_top1": best, "steps_to_target": steps,
            "images_to_target": steps * cfg.global_batch_size if reached else None,
            "seconds_to_target": reached.finished_at - started if reached else None,
            "device": resolved.device, "backend": resolved.backend, "precision": resolved.precision,
            "torch_version": torch.__version__, "ray_version": ray.__version__}


def run_distrib_point(sweep: SweepConfig, point: dict[str, Any], run_dir: Path) -> dict:
    """One point through the Orchestrator: a fresh group, warm-up, timed steps, profile."""
    import ray

    from distrib.driver import Orchestrator
    from distrib.metrics import summarize

    if sweep.target_top1:
        return run_to_target(sweep, point, run_dir)
    cfg = sweep.run_config(point, run_dir=str(run_dir))
    with Orchestrator(cfg, progress=False) as orch:
        orch.train(sweep.warmup_steps)
        timed = orch.train(sweep.timed_steps)
        profile = orch.profile()
        resolved, device_name = orch.cfg, orch.nodes[0].device_name
    summary = summarize(timed, global_batch_size=cfg.global_batch_size, warmup_steps=0)
    workers = cfg.num_workers
    exposed = max(0.0, summary["backward_s"] - profile["backward_compute_s"]) if workers > 1 else 0.0
    import torch

    return {
        "images_per_s": summary["images_per_s"], "step_s": summary["step_s"],
        "data_s": summary["data_s"], "forward_s": summary["forward_s"],
        "backward_s": summary["backward_s"], "backward_compute_s": profile["backward_compute_s"],
        "exposed_comm_s": exposed, "optimizer_s": summary["optimizer_s"],
        "driver_overhead_s": summary["driver_overhead_s"], "comm_s": summary["comm_s"],
        "allreduce_bytes": int(profile["allreduce_bytes"]),
        "achieved_busbw_gbps": _busbw_gbps(profile["allreduce_bytes"], summary["comm_s"], workers),
        "microbench_allreduce_s": profile["allreduce_s"],
        "microbench_busbw_gbps": _busbw_gbps(profile["allreduce_bytes"], profile["allreduce_s"], workers),
        "device": resolved.device, "device_name": device_name, "backend": resolved.backend,
        "precision": resolved.precision, "torch_version": torch.__version__, "ray_version": ray.__version__,
    }


def run_torchrun_point(sweep: SweepConfig, point: dict[str, Any]) -> dict:
    """The same point with plain torchrun + DDP on this machine (gloo, fp32, DDP defaults)."""
    import ray
    import torch

    base = sweep.base.replace(**{k: v for k, v in point.items() if k in BASELINE_KEYS})
    # One thread per process, as distrib gives each replica (cpus_per_worker); torchrun only
    # sets this itself for more than one process.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(base.cpus_per_worker)))}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(base.num_workers),
               "--master-addr", "127.0.0.1", "--master-port", str(comm.free_port()), "-m", "distrib.torchrun_baseline",
               "--steps", str(sweep.warmup_steps + sweep.timed_steps), "--warmup", str(sweep.warmup_steps),
               "--batch-size", str(base.batch_size_per_worker), "--image-size", str(base.image_size),
               "--num-classes", str(base.num_classes)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=base.step_timeout_s * 10)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun baseline failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"images_per_s": result["images_per_s"], "device": "cpu", "device_name": "cpu", "backend": "gloo",
            "precision": "fp32", "batchnorm": "train", "torch_version": torch.__version__,
            "ray_version": ray.__version__}


# ---- the sweep --------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_sweep(sweep: SweepConfig, *, baseline: str | None = None, resume_dir: str | Path | None = None,
              out_dir: Path | None = None, say=print) -> tuple[Path, list[dict]]:
    """Run every point not yet in OUT_DIR/results.jsonl, then write the tables and plots.
    `out_dir`: what check_out_dir returned for the same baseline and resume_dir (the CLI checks
    before Ray starts); None checks here."""
    out_dir = out_dir or check_out_dir(sweep, baseline=baseline, resume_dir=resume_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.yaml").write_text(_sweep_yaml(sweep))
    results_path = out_dir / "results.jsonl"
    done_ids = {row["point_id"] for row in _read_rows(results_path)}
    tools = ["distrib"] + ([baseline] if baseline else [])
    todo = _points_to_run(sweep, tools, done_ids)
    # A point's run directory is named by its place in the whole sweep, the same on a resume.
    number = {pid: n for n, (_, pid, _) in enumerate(_points_to_run(sweep, tools, set()), start=1)}
    if done_ids:
        say(f"resuming {out_dir}: {len(done_ids)} points done, {len(todo)} to run")
    for index, (tool, pid, point) in enumerate(todo, start=1):
        started = time.perf_counter()
        if tool == "distrib":
            run_dir = out_dir / "points" / f"{number[pid]:03d}"
            if run_dir.exists():  # the run of an interrupted attempt at this point: its row was never written
                shutil.rmtree(run_dir)
            measured = run_distrib_point(sweep, point, run_dir)
        else:
            measured = run_torchrun_point(sweep, point)
        row = _row(sweep, tool, pid, point, measured)
        with results_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        say(f"point {index}/{len(todo)}: {tool} {_say_point(point)}: "
            f"{row['images_per_s']:.1f} images/s ({time.perf_counter() - started:.0f} s)")
    rows = add_efficiency(_read_rows(results_path), sweep.scaling)
    write_outputs(out_dir, rows)
    return out_dir, rows


def check_out_dir(sweep: SweepConfig, *, baseline: str | None = None,
                  resume_dir: str | Path | None = None) -> Path:
    """OUT_DIR, checked but not made, so that bad input leaves nothing behind: a new one (`{time}`
    filled in now), or `resume_dir` if it holds this same sweep. ConfigError if it cannot be."""
    if baseline and sweep.target_top1:
        raise ConfigError("--baseline: a time-to-accuracy sweep (target_top1) runs distrib's points only; "
                          "drop --baseline or target_top1")
    if resume_dir:
        out_dir = Path(resume_dir)
        saved = out_dir / "sweep.yaml"
        if problem := unwritable(out_dir):
            raise ConfigError(f"--resume {str(out_dir)!r} is invalid: {problem}; give a sweep's out_dir")
        if not saved.is_file():
            raise ConfigError(f"--resume {str(out_dir)!r} is invalid: no sweep.yaml there; give a sweep's out_dir")
        if saved.read_text() != _sweep_yaml(sweep):
            raise ConfigError(f"--resume {str(out_dir)!r} is invalid: it holds a different sweep; "
                              "resume with the same sweep file")
        return out_dir
    out_dir = Path(sweep.out_dir.format(time=time.strftime("%Y%m%d-%H%M%S")))
    if problem := unwritable(out_dir):
        raise ConfigError(f"out_dir: {str(out_dir)!r} is invalid: {problem}; choose another out_dir")
    if (out_dir / "results.jsonl").exists():
        raise ConfigError(f"out_dir: {str(out_dir)!r} already holds a sweep; resume it with --resume {out_dir}")
    return out_dir


def _points_to_run(sweep: SweepConfig, tools: list[str], done_ids: set[str]) -> list[tuple[str, str, dict]]:
    """(tool, point id, point) for each point not done yet; a baseline point counts once even
    where distrib's points differ only in keys the baseline does not honour."""
    todo: list[tuple[str, str, dict]] = []
    for tool in tools:
        for point in sweep.points():
            key_point = point if tool == "distrib" else {k: v for k, v in point.items() if k in BASELINE_KEYS}
            pid = point_id(tool, key_point)
            if pid not in done_ids and pid not in {p[1] for p in todo}:
                todo.append((tool, pid, key_point))
    return todo


def _row(sweep: SweepConfig, tool: str, pid: str, point: dict[str, Any], measured: dict) -> dict:
    """One line of results.jsonl: the point's settings, then what was measured."""
    cfg = sweep.base.replace(**point)
    return {"point_id": pid, "tool": tool, "num_workers": cfg.num_workers,
            "batch_size_per_worker": cfg.batch_size_per_worker, "global_batch_size": cfg.global_batch_size,
            "image_size": cfg.image_size, "batchnorm": cfg.batchnorm, "bucket_cap_mb": cfg.bucket_cap_mb,
            "grad_compression": cfg.grad_compression, "placement_strategy": cfg.placement_strategy,
            "scaling": sweep.scaling, "warmup_steps": sweep.warmup_steps, "timed_steps": sweep.timed_steps,
            **measured}


def _sweep_yaml(sweep: SweepConfig) -> str:
    """OUT_DIR/sweep.yaml: what a --resume must match."""
    return yaml.safe_dump(_describe(sweep), sort_keys=False)


def _describe(sweep: SweepConfig) -> dict:
    return {"base": config.to_dict(sweep.base), "sweep": {k: list(v) for k, v in sweep.sweep.items()},
            "scaling": sweep.scaling, "global_batch_size": sweep.global_batch_size,
            "warmup_steps": sweep.warmup_steps, "timed_steps": sweep.timed_steps, "target_top1": sweep.target_top1}
