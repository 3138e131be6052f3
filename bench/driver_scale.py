"""The driver against a bare loop of the same Ray calls, on simulated replicas (issue 15).

For each N: N SimReplica actors (simreplica.py: each step sleeps --step-ms), driven
(1) by the Orchestrator, as `distrib simulate` does (checks every CHECK_EVERY steps, the
default calls_in_flight), and (2) by a bare loop of the same Ray calls that does nothing
else: it keeps the same number of calls of `run_steps(step, 1)` in flight on every actor,
calls `fingerprint` on every actor after every CHECK_EVERY steps, and reads the results
with one ray.get per call; no bookkeeping, no comparison, no metrics. Both run --steps
steps after a warm-up; `--rounds` alternating pairs, so drift in the machine's load hits
both. Printed: steps per second of each, their ratio, and 1000 / step-ms, the replicas'
own limit.

Goal (issue 15): at 128 replicas, 10 ms steps, steps_per_call 1, distrib's steps per
second at least 0.9 of 1/step; where this machine's cores are the limit (the bare loop
itself falls short of 1/step), at least 0.9 of the bare loop's.

    .venv/bin/python bench/driver_scale.py [--workers 64,128] [--step-ms 10] [--steps 150]

With --plot OUT.png --before DIR --after DIR: the driver's cost per step against N from two
`distrib simulate --sweep ... --out DIR` runs (the driver before and after a change, the same
--step-ms, calls_in_flight 1), beside the bare loop's cost at the same N measured now (its
step time minus --step-ms, calls_in_flight 1), as a table and a plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path

import ray

from distrib.replica import CONCURRENCY_GROUPS
from distrib.simreplica import SimReplica
from distrib.simulate import SIM_CPUS_PER_WORKER, sim_config, simulate, start_ray

WARMUP_STEPS = 20
CHECK_EVERY = 10


def bare_loop(workers: int, *, step_ms: float, steps: int, calls_in_flight: int) -> float:
    """Steps per second of the bare loop over `workers` fresh SimReplica actors."""
    cfg = sim_config(workers, step_ms=step_ms, steps=WARMUP_STEPS + steps, steps_per_call=1,
                     calls_in_flight=calls_in_flight, check_every=0, run_dir="unused")
    actor_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(SimReplica)
    actors = [actor_class.options(num_cpus=SIM_CPUS_PER_WORKER).remote() for _ in range(workers)]
    try:
        ray.get([a.prepare.remote(cfg, weights=None) for a in actors])
        ray.get([a.join.remote(world_rank=rank, world_size=workers, shards=[rank], master_addr="", master_port=0,
                               snapshot=None, first_step=0, faults=[]) for rank, a in enumerate(actors)])
        in_flight: deque = deque()
        started = 0.0
        for step in range(WARMUP_STEPS + steps):
            if step == WARMUP_STEPS:
                while in_flight:
                    ray.get(in_flight.popleft())
                started = time.perf_counter()
            in_flight.append([a.run_steps.remote(step, 1) for a in actors])
            if (step + 1) % CHECK_EVERY == 0:
                in_flight.append([a.fingerprint.remote() for a in actors])
            if len(in_flight) >= calls_in_flight:
                ray.get(in_flight.popleft())
        while in_flight:
            ray.get(in_flight.popleft())
        return steps / (time.perf_counter() - started)
    finally:
        for actor in actors:
            ray.kill(actor)


def distrib_steps_per_s(workers: int, *, step_ms: float, steps: int, calls_in_flight: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        point = simulate(sim_config(workers, step_ms=step_ms, steps=steps + WARMUP_STEPS, steps_per_call=1,
                                    calls_in_flight=calls_in_flight, check_every=CHECK_EVERY, run_dir=run_dir))
    return point.steps_per_s


def bare_cost_s(workers: int, *, step_ms: float, steps: int) -> float:
    """The bare loop's time per step beyond step_ms, one call in flight: what Ray's calls alone cost."""
    return 1 / bare_loop(workers, step_ms=step_ms, steps=steps, calls_in_flight=1) - step_ms / 1e3


def plot_sweeps(out: Path, before_dir: Path, after_dir: Path, *, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = {}
    for name, folder in (("before", before_dir), ("after", after_dir)):
        points = [p for p in json.loads((folder / "points.json").read_text())["points"] if p["steps_per_call"] == 1]
        sweeps[name] = {p["workers"]: p["driver_cost_s"] for p in points}
    counts = sorted(set(sweeps["before"]) & set(sweeps["after"]))
    step_ms = json.loads((after_dir / "points.json").read_text())["points"][0]["step_ms"]
    sweeps["bare loop of the same calls"] = {n: bare_cost_s(n, step_ms=step_ms, steps=steps) for n in counts}
    print("| replicas | " + " | ".join(f"{name} (ms)" for name in sweeps) + " | after / before |")
    print("| --- | " + " | ".join("---" for _ in sweeps) + " | --- |")
    for n in counts:
        print(f"| {n} | " + " | ".join(f"{costs[n] * 1e3:.1f}" for costs in sweeps.values())
              + f" | {sweeps['after'][n] / sweeps['before'][n]:.2f} |")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, costs in sweeps.items():
        ax.plot(counts, [costs[n] * 1e3 for n in counts], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("simulated replicas N")
    ax.set_ylabel("driver cost per step (ms)")
    ax.set_title(f"Driver cost per step, {step_ms:g} ms steps, steps_per_call 1, 1 call in flight")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="64,128")
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--calls-in-flight", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--before", type=Path)
    parser.add_argument("--after", type=Path)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    started_ray = start_ray(None, max(counts))
    if args.plot:
        try:
            plot_sweeps(args.plot, args.before, args.after, steps=args.steps)
        finally:
            if started_ray:
                ray.shutdown()
        return
    run = dict(step_ms=args.step_ms, steps=args.steps, calls_in_flight=args.calls_in_flight)
    try:
        for workers in counts:
            ours, bare = [], []
            for _ in range(args.rounds):
                bare.append(bare_loop(workers, **run))
                ours.append(distrib_steps_per_s(workers, **run))
            ratio = statistics.median(o / b for o, b in zip(ours, bare))
            print(f"{workers} replicas, {args.step_ms:g} ms steps, {args.calls_in_flight} call(s) in flight: "
                  f"distrib {statistics.median(ours):.1f} steps/s, bare loop {statistics.median(bare):.1f}, "
                  f"1/step {1e3 / args.step_ms:.1f}; distrib / bare {ratio:.3f} (goal >= 0.9), "
                  f"rounds: {', '.join(f'{o:.1f}/{b:.1f}' for o, b in zip(ours, bare))}", flush=True)
    finally:
        if started_ray:
            ray.shutdown()


if __name__ == "__main__":
    main()
