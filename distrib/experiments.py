"""Scaling sweeps: throughput, efficiency and where the time goes, per worker count and setting.

    distrib scale --config configs/sweep-laptop.yaml                      # distrib only
    distrib scale --config configs/sweep-laptop.yaml --baseline torchrun  # and plain torchrun + DDP
    distrib scale --config configs/sweep-laptop.yaml --resume runs/sweep-X  # skip finished points

Each point starts a fresh group (resources reserved before any timing), runs
warm-up steps that are not counted, then timed steps, then a profile on the live
group: backward without all-reduce (what the overlap hides) and a plain all-reduce
of the gradient bytes (the microbenchmark). Rows go to OUT_DIR/results.jsonl as each
point finishes; results.csv, results.json and the PNG plots are rebuilt at the end.
"""

from __future__ import annotations

import csv
import difflib
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distrib import comm, config
from distrib.config import ConfigError, RunConfig

SWEEPABLE = ("num_workers", "batch_size_per_worker", "image_size", "precision", "bucket_cap_mb",
             "grad_compression", "placement_strategy")
"""Run-config keys a sweep may vary; num_workers must be among them."""

BASELINE_KEYS = ("num_workers", "batch_size_per_worker", "image_size")
"""What the torchrun baseline honours; it keeps its own defaults (fp32, DDP's) for the rest."""

_SWEEP_KEYS = ("base", "sweep", "scaling", "global_batch_size", "warmup_steps", "timed_steps", "out_dir")


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """A scaling sweep: a base run config and the values to sweep."""

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


def _fail(key: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"sweep {key}: {value!r} is invalid: {rule}")


def load_sweep(path: str | Path) -> SweepConfig:
    """A validated SweepConfig from YAML; ConfigError (one line) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {str(path)!r} is invalid: no such file; pass an existing sweep YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {str(path)!r} is malformed YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {str(path)!r} is invalid: must be a YAML mapping with base and sweep")
    for key in raw:
        if key not in _SWEEP_KEYS:
            close = difflib.get_close_matches(key, _SWEEP_KEYS, n=1)
            raise ConfigError(f"sweep {key}: unknown key" + (f"; did you mean {close[0]!r}?" if close else
                                                             f"; known keys: {', '.join(_SWEEP_KEYS)}"))
    base_values = raw.get("base") or {}
    if not isinstance(base_values, dict):
        raise _fail("base", base_values, "must be a mapping of run-config keys")
    try:
        base = config.from_dict(base_values)
    except ConfigError as err:
        raise ConfigError(f"sweep base.{err}") from None
    sweep = raw.get("sweep")
    if not isinstance(sweep, dict) or "num_workers" not in sweep:
        raise _fail("sweep", sweep, "must be a mapping with at least num_workers: [1, 2, ...]")
    values: dict[str, tuple] = {}
    for key, options in sweep.items():
        if key not in SWEEPABLE:
            raise _fail(f"sweep.{key}", options, f"cannot be swept; sweepable: {', '.join(SWEEPABLE)}")
        if not isinstance(options, list) or not options:
            raise _fail(f"sweep.{key}", options, "must be a non-empty list of values")
        for option in options:  # each value must be valid for the run config
            try:
                base.replace(**{key: option})
            except ConfigError as err:
                raise ConfigError(f"sweep sweep.{err}") from None
        values[key] = tuple(options)
    scaling = raw.get("scaling", "weak")
    if scaling not in ("weak", "strong"):
        raise _fail("scaling", scaling, "must be weak or strong")
    global_batch = raw.get("global_batch_size", 0)
    if scaling == "strong":
        if "batch_size_per_worker" in values:
            raise _fail("sweep.batch_size_per_worker", values["batch_size_per_worker"],
                        "strong scaling derives it from global_batch_size; sweep one or the other")
        if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < 1:
            raise _fail("global_batch_size", global_batch, "strong scaling needs a positive integer")
        for workers in values["num_workers"]:
            if global_batch % workers:
                raise _fail("global_batch_size", global_batch, f"must divide by every num_workers ({workers})")
    for key in ("warmup_steps", "timed_steps"):
        value = raw.get(key, 3 if key == "warmup_steps" else 10)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(key, value, "must be an integer >= 1")
    out_dir = raw.get("out_dir", "runs/sweep-{time}")
    if not isinstance(out_dir, str) or not out_dir:
        raise _fail("out_dir", out_dir, "must be a non-empty path")
    return SweepConfig(base=base, sweep=values, scaling=scaling, global_batch_size=global_batch,
                       warmup_steps=raw.get("warmup_steps", 3), timed_steps=raw.get("timed_steps", 10),
                       out_dir=out_dir)


def point_id(tool: str, point: dict[str, Any]) -> str:
    return tool + "|" + "|".join(f"{k}={point[k]}" for k in sorted(point))


# ---- running points -----------------------------------------------------------------------------
def _busbw_gbps(num_bytes: int, seconds: float, workers: int) -> float | None:
    """All-reduce bus bandwidth (NCCL-tests' definition): bytes x 2(n-1)/n per second, in GB/s."""
    if workers < 2 or seconds <= 0 or num_bytes <= 0:
        return None
    return num_bytes * 2 * (workers - 1) / workers / seconds / 1e9


def run_distrib_point(sweep: SweepConfig, point: dict[str, Any], run_dir: Path) -> dict:
    """One point through the Orchestrator: a fresh group, warm-up, timed steps, profile."""
    import ray

    from distrib.driver import Orchestrator
    from distrib.metrics import summarize

    # Checks and checkpoints off: the timed steps are training alone (a final check still runs).
    cfg = sweep.base.replace(**point, steps=sweep.warmup_steps + sweep.timed_steps, run_dir=str(run_dir),
                             check_every=0, checkpoint_every=0)
    with Orchestrator(cfg, progress=False) as orch:
        orch.train(sweep.warmup_steps)
        timed = orch.train(sweep.timed_steps)
        profile = orch.profile()
        resolved, device_name = orch.cfg, orch.nodes[0]["device_name"]
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
            "precision": "fp32", "torch_version": torch.__version__, "ray_version": ray.__version__}


# ---- the sweep --------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_sweep(sweep: SweepConfig, *, baseline: str | None = None, resume_dir: str | Path | None = None,
              say=print) -> tuple[Path, list[dict]]:
    """Run every point not yet in OUT_DIR/results.jsonl, then write the tables and plots."""
    out_dir = Path(resume_dir) if resume_dir else Path(sweep.out_dir.format(time=time.strftime("%Y%m%d-%H%M%S")))
    saved = out_dir / "sweep.yaml"
    description = yaml.safe_dump(_describe(sweep), sort_keys=False)
    if resume_dir:
        if not saved.is_file():
            raise ConfigError(f"--resume {str(out_dir)!r} is invalid: no sweep.yaml there; give a sweep's out_dir")
        if saved.read_text() != description:
            raise ConfigError(f"--resume {str(out_dir)!r} is invalid: it holds a different sweep; "
                              "resume with the same sweep file")
    elif (out_dir / "results.jsonl").exists():
        raise ConfigError(f"out_dir: {str(out_dir)!r} already holds a sweep; resume it with --resume {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(description)
    results_path = out_dir / "results.jsonl"
    done_ids = {row["point_id"] for row in _read_rows(results_path)}
    tools = ["distrib"] + ([baseline] if baseline else [])
    todo = []
    for tool in tools:
        for point in sweep.points():
            key_point = point if tool == "distrib" else {k: v for k, v in point.items() if k in BASELINE_KEYS}
            pid = point_id(tool, key_point)
            if pid not in done_ids and pid not in {p[1] for p in todo}:
                todo.append((tool, pid, key_point))
    skipped = len(done_ids)
    if skipped:
        say(f"resuming {out_dir}: {skipped} points done, {len(todo)} to run")
    for index, (tool, pid, point) in enumerate(todo, start=1):
        started = time.perf_counter()
        if tool == "distrib":
            measured = run_distrib_point(sweep, point, out_dir / "points" / f"{index:03d}")
        else:
            measured = run_torchrun_point(sweep, point)
        cfg = sweep.base.replace(**point)
        row = {"point_id": pid, "tool": tool, "num_workers": cfg.num_workers,
               "batch_size_per_worker": cfg.batch_size_per_worker, "global_batch_size": cfg.global_batch_size,
               "image_size": cfg.image_size, "bucket_cap_mb": cfg.bucket_cap_mb,
               "grad_compression": cfg.grad_compression, "placement_strategy": cfg.placement_strategy,
               "scaling": sweep.scaling, "warmup_steps": sweep.warmup_steps, "timed_steps": sweep.timed_steps,
               **measured}
        with results_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        say(f"point {index}/{len(todo)}: {tool} {', '.join(f'{k}={v}' for k, v in point.items())}: "
            f"{row['images_per_s']:.1f} images/s ({time.perf_counter() - started:.0f} s)")
    rows = add_efficiency(_read_rows(results_path), sweep)
    write_outputs(out_dir, rows)
    return out_dir, rows


def _describe(sweep: SweepConfig) -> dict:
    return {"base": config.to_dict(sweep.base), "sweep": {k: list(v) for k, v in sweep.sweep.items()},
            "scaling": sweep.scaling, "global_batch_size": sweep.global_batch_size,
            "warmup_steps": sweep.warmup_steps, "timed_steps": sweep.timed_steps}


_SERIES_KEYS = ("tool", "image_size", "precision", "bucket_cap_mb", "grad_compression", "placement_strategy")


def series_key(row: dict, scaling: str) -> tuple:
    """Rows of one line in the plots: everything but the worker count (and, under weak scaling,
    with the per-worker batch fixed; under strong scaling, with the global batch fixed)."""
    batch = row["global_batch_size"] if scaling == "strong" else row["batch_size_per_worker"]
    return tuple(row.get(k) for k in _SERIES_KEYS) + (batch,)


def add_efficiency(rows: list[dict], sweep: SweepConfig) -> list[dict]:
    """efficiency = images/s / (num_workers x images/s of the 1-worker point of the same series)."""
    single = {series_key(r, sweep.scaling): r["images_per_s"] for r in rows if r["num_workers"] == 1}
    for row in rows:
        one = single.get(series_key(row, sweep.scaling))
        row["efficiency"] = row["images_per_s"] / (row["num_workers"] * one) if one else None
    return rows


# ---- outputs ----------------------------------------------------------------------------------
_CSV_COLUMNS = ("tool", "num_workers", "batch_size_per_worker", "global_batch_size", "image_size", "precision",
                "bucket_cap_mb", "grad_compression", "placement_strategy", "scaling", "images_per_s", "efficiency",
                "step_s", "data_s", "forward_s", "backward_s", "backward_compute_s", "exposed_comm_s", "optimizer_s",
                "driver_overhead_s", "comm_s", "allreduce_bytes", "achieved_busbw_gbps", "microbench_allreduce_s",
                "microbench_busbw_gbps", "device", "device_name", "backend", "torch_version", "ray_version",
                "warmup_steps", "timed_steps", "point_id")


def write_outputs(out_dir: Path, rows: list[dict]) -> None:
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    _plot(out_dir, rows)


def _plot(out_dir: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaling = rows[0]["scaling"] if rows else "weak"
    series: dict[tuple, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["num_workers"]):
        series.setdefault(series_key(row, scaling), []).append(row)

    def label(rows_of_series: list[dict]) -> str:
        r = rows_of_series[0]
        batch = f"global batch {r['global_batch_size']}" if scaling == "strong" else f"batch {r['batch_size_per_worker']}/worker"
        extra = "" if r["tool"] != "distrib" else f", {r['precision']}, {r['grad_compression']} compression"
        return f"{r['tool']}: {r['image_size']} px, {batch}{extra}"

    def save(fig, ax, name: str) -> None:
        ax.set_xticks(sorted({r["num_workers"] for r in rows}))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rs in series.values():
        workers = [r["num_workers"] for r in rs]
        line, = ax.plot(workers, [r["images_per_s"] for r in rs], marker="o", label=label(rs))
        ones = [r for r in rs if r["num_workers"] == 1]
        if ones:
            ax.plot(workers, [w * ones[0]["images_per_s"] for w in workers], linestyle="--",
                    color=line.get_color(), alpha=0.5, label="ideal (linear from 1 worker)")
    ax.set(xlabel="workers", ylabel="images/s", title=f"Throughput ({scaling} scaling)")
    save(fig, ax, "throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rs in series.values():
        with_eff = [r for r in rs if r.get("efficiency") is not None]
        ax.plot([r["num_workers"] for r in with_eff], [r["efficiency"] for r in with_eff], marker="o", label=label(rs))
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="workers", ylabel="efficiency (images/s / (N x 1-worker images/s))",
           title="Scaling efficiency", ylim=(0, 1.2))
    save(fig, ax, "efficiency.png")

    ours = [r for r in rows if r["tool"] == "distrib"]
    parts = [("data_s", "data"), ("forward_s", "forward"), ("backward_compute_s", "backward compute"),
             ("exposed_comm_s", "exposed all-reduce"), ("optimizer_s", "optimizer"), ("driver_overhead_s", "driver")]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ours) + 2), 4.5))
    names = [f"{r['num_workers']}w {r['image_size']}px b{r['batch_size_per_worker']}" for r in ours]
    bottom = [0.0] * len(ours)
    for key, text in parts:
        # backward_s = backward compute + exposed all-reduce; clamp so the stack adds up to the step
        heights = [1e3 * (min(r[key], r["backward_s"]) if key == "backward_compute_s" else r[key]) for r in ours]
        ax.bar(names, heights, bottom=bottom, label=text)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set(ylabel="ms per step", title="Where a step's time goes (distrib)")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "breakdown.png", dpi=110)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    """The sweep as a Markdown table: one line per point ("-" where a tool does not measure it)."""
    def value(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
        return format(row[key] * scale, fmt) if row.get(key) is not None else "-"

    lines = ["| tool | workers | batch/worker | px | images/s | efficiency | step ms | exposed all-reduce ms "
             "| busbw achieved / microbench GB/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["tool"] != "distrib", r["tool"], r["image_size"], r["num_workers"])):
        lines.append(f"| {r['tool']} | {r['num_workers']} | {r['batch_size_per_worker']} | {r['image_size']} | "
                     f"{r['images_per_s']:.1f} | {value(r, 'efficiency', '.3f')} | {value(r, 'step_s', '.1f', 1e3)} | "
                     f"{value(r, 'exposed_comm_s', '.1f', 1e3)} | {value(r, 'achieved_busbw_gbps', '.2f')} / "
                     f"{value(r, 'microbench_busbw_gbps', '.2f')} |")
    return "\n".join(lines)
