"""`distrib simulate`: what the driver costs per step, measured against simulated replicas.

    distrib simulate --workers 64 --step-ms 7                        # one point
    distrib simulate --workers 64 --step-ms 7 --steps-per-call 4 --calls-in-flight 2
    distrib simulate --sweep 2,4,8,16,32,64,128 --step-ms 7 --steps-per-call 1,4 --out runs/sim

The real Orchestrator drives SimReplica actors (simreplica.py), whose step sleeps
`--step-ms`, so whatever a step takes beyond that is the driver's: its calls, its waits,
its bookkeeping, and Ray's transport both ways. Figures are over the steps after a warm-up
(the first WARMUP_FRACTION of the run, at least calls_in_flight + 1 calls):

- driver cost per step: the mean wall time per step, as the driver measures it, minus --step-ms;
- steps per second, against 1000 / step-ms;
- calls per second: every replica's calls of steps and checks, over the timed wall time;
- last result -> next call: from the moment the last replica returned a call of steps to the
  moment the next one was running on every replica (the replicas' clocks: one machine).

--calls-in-flight defaults to 1: nothing queued ahead hides the driver, so the cost measured
is all of it; with more, the part of it that fits under the replicas' steps is hidden.
A sweep fits cost per call = a + b x replicas by least squares for each steps_per_call, and
with two of them splits the cost into a part per call and a part per step (which more steps
per call do not shrink). On one machine the replicas' own Ray work shares its cores with the
driver, so the figures are an upper bound for a cluster.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import ray

from distrib.config import RunConfig
from distrib.errors import ConfigError
from distrib.preflight import unwritable

SIM_CPUS_PER_WORKER = 0.01
"""CPUs reserved per simulated replica: it sleeps, so 128 fit a 2-CPU machine's Ray instance."""
WARMUP_FRACTION = 0.1
"""Leading share of the steps left out of the figures (actors' first calls, Ray's first transfers)."""
BUDGET_FRACTION = 0.05
"""The projection's target: the driver's cost at most this share of a step."""
PROJECTED_WORKERS = 1000


@dataclass(frozen=True, kw_only=True)
class Point:
    """One simulated run's figures; seconds unless the name says otherwise."""

    workers: int
    step_ms: float
    steps_per_call: int
    calls_in_flight: int
    timed_steps: int
    wall_s: float
    """Mean driver wall time per timed step."""
    replica_step_s: float
    """Mean of the slowest replica's own step (the sleep and its overshoot)."""
    driver_cost_s: float
    """wall_s minus step_ms."""
    steps_per_s: float
    calls_per_s: float
    calls_per_step: float
    """Calls of steps and checks per step, on every replica together."""
    result_to_next_s: float
    """Mean time from the last replica's result of a call of steps to the next call running on all."""
    checks_passed: int


def start_ray(address: str | None, workers: int) -> bool:
    """Join `address` (or $RAY_ADDRESS), else start a local instance with room for `workers`
    simulated replicas; returns whether it started one (to shut down after)."""
    from distrib.cluster import connect_ray

    if ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"):
        return connect_ray(address)
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(workers * SIM_CPUS_PER_WORKER) + 1),
             include_dashboard=False, logging_level=logging.WARNING)
    return True


def sim_config(workers: int, *, step_ms: float, steps: int, steps_per_call: int, calls_in_flight: int,
               check_every: int, run_dir: str, faults: str = "") -> RunConfig:
    """A run of simulated replicas: CPU, gloo, no checkpoints, a tiny CPU reservation each.
    ConfigError for one that cannot run."""
    if not (math.isfinite(step_ms) and step_ms > 0):  # 0 would make them real replicas
        raise ConfigError(f"--step-ms: {step_ms!r} is invalid: must be a finite number > 0 (each simulated "
                          "step's sleep, in ms), e.g. --step-ms 7")
    return RunConfig(num_workers=workers, device="cpu", backend="gloo", cpus_per_worker=SIM_CPUS_PER_WORKER,
                     simulate_step_ms=step_ms, steps=steps, steps_per_call=steps_per_call,
                     calls_in_flight=calls_in_flight, check_every=check_every, checkpoint_every=0,
                     weights="none", faults=faults, run_dir=run_dir)


def check(workers: list[int], *, steps_per_call: list[int], out_dir: Path | None, **run) -> None:
    """ConfigError, before Ray starts and before anything is written, for a run or sweep that
    cannot be measured: a point's config, steps that end within the warm-up, an out_dir that
    cannot be made (None: nothing is written). `run`: sim_config's other arguments."""
    for flag, values in (("--sweep", workers), ("--steps-per-call", steps_per_call)):
        if len(set(values)) < len(values):  # two fits of one K would divide by 1/K - 1/K = 0
            raise ConfigError(f"{flag} {','.join(map(str, values))} is invalid: a value is given twice; "
                              "give each once")
    for k in steps_per_call:
        for n in workers:
            cfg = sim_config(n, steps_per_call=k, run_dir="unused", **run)
            warmup = warmup_steps(cfg)
            if cfg.steps <= warmup:
                raise ConfigError(f"steps: {cfg.steps} is invalid: it leaves no step after the {warmup} warm-up "
                                  f"steps (steps_per_call={k}); run more than {warmup} steps")
    if out_dir is not None and (problem := unwritable(out_dir)):
        raise ConfigError(f"--out {str(out_dir)!r} is invalid: {problem}; choose another --out")


def warmup_steps(cfg: RunConfig) -> int:
    """The leading steps measure leaves out: WARMUP_FRACTION of them, at least calls_in_flight + 1 calls."""
    return max(round(cfg.steps * WARMUP_FRACTION), cfg.steps_per_call * (cfg.calls_in_flight + 1))


def simulate(cfg: RunConfig) -> Point:
    """Run `cfg` (simulate_step_ms > 0) through the Orchestrator on the connected Ray and measure it."""
    from distrib.driver import Orchestrator

    if not cfg.simulate_step_ms:
        raise ValueError("simulate needs simulate_step_ms > 0")
    with Orchestrator(cfg, progress=False) as orch:
        orch.train()
        timelines = ray.get([replica.timeline.remote() for replica in orch.replicas])
        return measure(orch.cfg, orch.history, timelines, checks_passed=orch.checks_passed)


def measure(cfg: RunConfig, history: list, timelines: list[list[tuple[str, int, float, float]]], *,
            checks_passed: int) -> Point:
    """The figures of a finished run from the driver's step metrics and each replica's timeline."""
    warmup = warmup_steps(cfg)
    timed = [m for m in history if m.step >= warmup]
    if not timed:
        raise ValueError(f"steps={cfg.steps} leaves no step after the {warmup} warm-up steps; run more steps")
    wall_s = sum(m.wall_s for m in timed)
    # The calls whose waits fall in the timed steps' wall time: steps from the warm-up on, and the
    # checks between them (the one at the end is waited after the last step's time is taken).
    calls = sum(1 for _, step, _, _ in timelines[0] if warmup <= step < cfg.steps)
    steps_calls = [[(began, returned) for method, step, began, returned in timeline
                    if method == "run_steps" and step >= warmup] for timeline in timelines]
    gaps = [max(rank[k + 1][0] for rank in steps_calls) - max(rank[k][1] for rank in steps_calls)
            for k in range(min(len(rank) for rank in steps_calls) - 1)]
    step_s = cfg.simulate_step_ms / 1e3
    mean_wall_s = wall_s / len(timed)
    return Point(workers=cfg.num_workers, step_ms=cfg.simulate_step_ms, steps_per_call=cfg.steps_per_call,
                 calls_in_flight=cfg.calls_in_flight, timed_steps=len(timed), wall_s=mean_wall_s,
                 replica_step_s=statistics.fmean(m.step_s for m in timed), driver_cost_s=mean_wall_s - step_s,
                 steps_per_s=len(timed) / wall_s, calls_per_s=calls * cfg.num_workers / wall_s,
                 calls_per_step=calls * cfg.num_workers / len(timed),
                 result_to_next_s=statistics.fmean(gaps) if gaps else float("nan"), checks_passed=checks_passed)


def format_point(point: Point) -> str:
    """The figures of one run, one per line."""
    step_ms = point.step_ms
    return "\n".join([
        f"simulated: {point.workers} replicas, step {step_ms:g} ms, {point.steps_per_call} step(s) per call, "
        f"{point.calls_in_flight} call(s) in flight, {point.timed_steps} timed steps",
        f"driver cost per step:  {point.driver_cost_s * 1e3:.3f} ms ({point.driver_cost_s / (step_ms / 1e3):.1%} "
        f"of the step; wall {point.wall_s * 1e3:.3f} ms, the replicas' own step {point.replica_step_s * 1e3:.3f} ms)",
        f"steps per second:      {point.steps_per_s:.1f} (ideal {1e3 / step_ms:.1f})",
        f"calls per second:      {point.calls_per_s:.0f} ({point.calls_per_step:.2f} calls per step: "
        f"{point.workers} replicas x {point.calls_per_step / point.workers:.2f})",
        f"last result -> next call running on every replica: {point.result_to_next_s * 1e3:.3f} ms (mean)",
        f"checks passed:         {point.checks_passed}",
    ])


# ---- sweeps ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    """Driver cost per call = per_call_s + per_replica_s x replicas (least squares), at steps_per_call."""

    steps_per_call: int
    per_call_s: float
    per_replica_s: float

    def cost_per_step_s(self, workers: int) -> float:
        return (self.per_call_s + self.per_replica_s * workers) / self.steps_per_call


def fit(points: list[Point]) -> Fit:
    """Least-squares line through the driver's cost per call (cost per step x steps per call) against replicas."""
    xs = [p.workers for p in points]
    ys = [p.driver_cost_s * p.steps_per_call for p in points]
    slope, intercept = statistics.linear_regression(xs, ys) if len(set(xs)) > 1 else (0.0, statistics.fmean(ys))
    return Fit(points[0].steps_per_call, intercept, slope)


def projection(fits: list[Fit], *, step_ms: float, workers: int = PROJECTED_WORKERS) -> str:
    """The smallest steps_per_call keeping the driver under BUDGET_FRACTION of a `step_ms` step at `workers`.

    With one fit, all the cost is taken to be per call (K steps per call divide it by K). With two
    (steps per call K1 < K2), cost per step = P/K + S: P, the part per call, and S, the part per
    step that no K shrinks (the records of every replica for every step), are solved from the two
    lines at `workers`."""
    budget_s = BUDGET_FRACTION * step_ms / 1e3
    if len(fits) == 1:
        per_call_s, per_step_s = fits[0].per_call_s + fits[0].per_replica_s * workers, 0.0
    else:
        low, high = sorted(fits, key=lambda f: f.steps_per_call)[:2]
        c_low, c_high = low.cost_per_step_s(workers), high.cost_per_step_s(workers)
        per_call_s = max(0.0, (c_low - c_high) / (1 / low.steps_per_call - 1 / high.steps_per_call))
        per_step_s = max(0.0, c_low - per_call_s / low.steps_per_call)
    head = (f"{workers} replicas, {step_ms:g} ms steps: {per_call_s * 1e3:.2f} ms per call + "
            f"{per_step_s * 1e3:.2f} ms per step; budget {budget_s * 1e3:.2f} ms per step: ")
    if per_step_s >= budget_s:
        return head + "no steps_per_call is enough (the part per step alone is over it)"
    return head + f"steps_per_call >= {math.ceil(per_call_s / (budget_s - per_step_s))}"


def format_table(points: list[Point]) -> str:
    rows = ["replicas  K  C   wall ms  cost ms  cost/step  steps/s  calls/s  result->next ms"]
    for p in points:
        rows.append(f"{p.workers:8d} {p.steps_per_call:2d} {p.calls_in_flight:2d} {p.wall_s * 1e3:9.3f} "
                    f"{p.driver_cost_s * 1e3:8.3f} {p.driver_cost_s / (p.step_ms / 1e3):10.1%} {p.steps_per_s:8.1f} "
                    f"{p.calls_per_s:8.0f} {p.result_to_next_s * 1e3:16.3f}")
    return "\n".join(rows)


def plot(points: list[Point], fits: list[Fit], path: Path) -> None:
    """Driver cost per step against replicas, a line per steps_per_call with its fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for f in fits:
        mine = [p for p in points if p.steps_per_call == f.steps_per_call]
        xs = [p.workers for p in mine]
        line = ax.plot(xs, [p.driver_cost_s * 1e3 for p in mine], "o", label=f"steps_per_call {f.steps_per_call}")
        along = [min(xs) + (max(xs) - min(xs)) * i / 50 for i in range(51)]  # a line is curved on a log axis
        ax.plot(along, [f.cost_per_step_s(n) * 1e3 for n in along], "-",
                color=line[0].get_color(), label=f"fit: ({f.per_call_s * 1e3:.2f} ms + {f.per_replica_s * 1e6:.0f} "
                                                 f"us x N) / {f.steps_per_call}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("simulated replicas N")
    ax.set_ylabel("driver cost per step (ms)")
    ax.set_title(f"Driver cost per step, {points[0].step_ms:g} ms steps, {points[0].calls_in_flight} call(s) in flight")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(workers: list[int], *, steps_per_call: list[int], out_dir: Path, say: Callable[[str], None],
          **run) -> tuple[list[Point], list[Fit]]:
    """Every (replicas, steps_per_call) point on the connected Ray, one after the other; writes
    OUT_DIR/points.json and OUT_DIR/driver_cost.png. `run`: sim_config's other arguments. Bad
    input is a ConfigError (check) before any point runs or anything is written."""
    check(workers, steps_per_call=steps_per_call, out_dir=out_dir, **run)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = []
    with tempfile.TemporaryDirectory() as runs:
        for k in steps_per_call:
            for n in workers:
                started = time.monotonic()
                point = simulate(sim_config(n, steps_per_call=k, run_dir=f"{runs}/n{n}-k{k}", **run))
                say(f"{n} replicas, {k} step(s) per call: driver cost {point.driver_cost_s * 1e3:.3f} ms per step "
                    f"({time.monotonic() - started:.0f} s)")
                points.append(point)
    fits = [fit([p for p in points if p.steps_per_call == k]) for k in steps_per_call]
    (out_dir / "points.json").write_text(json.dumps({"points": [asdict(p) for p in points],
                                                     "fits": [asdict(f) for f in fits]}, indent=1))
    plot(points, fits, out_dir / "driver_cost.png")
    return points, fits


def format_fits(fits: list[Fit], *, step_ms: float) -> str:
    lines = [f"fit, steps_per_call {f.steps_per_call}: driver cost per call = {f.per_call_s * 1e3:.3f} ms + "
             f"{f.per_replica_s * 1e6:.1f} us x replicas" for f in fits]
    for target_ms in sorted({step_ms, 7.0, 100.0}):
        lines.append("projection: " + projection(fits, step_ms=target_ms))
    return "\n".join(lines)
