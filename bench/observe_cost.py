"""The cost of watching a run on training speed: `tensorboard: true` and `prometheus: true`
(metrics through Ray) against both off.

The default job's workload (2 CPU workers, resnet18, 64 px, 32 images per worker,
gloo), `--rounds` alternating pairs of runs on one local Ray instance so drift in the
machine's load hits both; prints each round's ratio and the median. Goal: at most 1%
slower (ratio >= 0.99). Rounds on this 2-core machine vary by several percent, more than
the goal, so it also times the writers themselves: the driver's seconds per step spent in
TensorBoardLog.write and in RunGauges.step (for 2 ranks and for 1,000), against the step
time measured.

    .venv/bin/python bench/observe_cost.py [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray

from distrib import Orchestrator, RunConfig
from distrib.metrics import StepMetrics
from distrib.prom import RunGauges, default_publish_interval_s
from distrib.tblog import TensorBoardLog


def images_per_s(run_dir: Path, steps: int, watched: bool) -> float:
    cfg = RunConfig(num_workers=2, device="cpu", steps=steps, image_size=64, batch_size_per_worker=32,
                    checkpoint_every=0, tensorboard=watched, prometheus=watched, run_dir=str(run_dir))
    with Orchestrator(cfg, progress=False) as orch:
        orch.train()
        return orch.summary()["images_per_s"]


def step_metrics(count: int) -> list[StepMetrics]:
    return [StepMetrics(step=i, finished_at=time.time(), loss=1.0, lr=0.1, images_per_s=100.0, wall_s=0.5,
                        step_s=0.5, data_s=0.01, forward_s=0.1, backward_s=0.3, optimizer_s=0.05, comm_s=0.2)
            for i in range(count)]


def write_s(tmp: Path, count: int = 2000) -> float:
    """Seconds TensorBoardLog.write takes per step record, over `count` records."""
    log = TensorBoardLog(tmp / "tb-micro", RunConfig(), upload_every_s=0.0)  # local: never uploads
    records = step_metrics(count)
    start = time.perf_counter()
    for record in records:
        log.write(record)
    elapsed = time.perf_counter() - start
    log.close()
    return elapsed / count


def publish_s(ranks: int, steps: int = 400) -> float:
    """Seconds RunGauges.step takes per step with `ranks` ranks' records, publishing included
    (every half export interval, as in a run: the steps are spread over 2 x that interval)."""
    gauges = RunGauges(f"bench-{ranks}")
    record = {"step": 0, "loss": 1.0, "data_s": 0.01, "forward_s": 0.1, "backward_s": 0.3, "optimizer_s": 0.05,
              "comm_s": 0.2}
    rank_records = [record] * ranks
    pause_s = 2 * default_publish_interval_s() / steps  # so that about two publishes fall in the loop
    spent = 0.0
    for metrics in step_metrics(steps):
        start = time.perf_counter()
        gauges.step(metrics, rank_records, recoveries=0, checks_passed=0)
        spent += time.perf_counter() - start
        time.sleep(pause_s)
    return spent / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            off = images_per_s(Path(tmp) / f"off-{round_index}", args.steps, watched=False)
            on = images_per_s(Path(tmp) / f"on-{round_index}", args.steps, watched=True)
            ratios.append(on / off)
            print(f"round {round_index + 1}: off {off:.1f} images/s, on {on:.1f} images/s, on / off {on / off:.3f}",
                  flush=True)
        per_step = write_s(Path(tmp))
        published = {ranks: publish_s(ranks) for ranks in (2, 1000)}
    step_s = 64 / off
    print(f"median on / off: {statistics.median(ratios):.3f} (goal >= 0.99)")
    print(f"TensorBoardLog.write: {per_step * 1e3:.3f} ms per step, {per_step / step_s:.2%} of a {step_s * 1e3:.0f} ms "
          "step (the driver's own time; it overlaps the replicas' next step)")
    for ranks, seconds in published.items():
        print(f"RunGauges.step, {ranks} ranks: {seconds * 1e3:.3f} ms per step with its publishes, "
              f"{seconds / step_s:.2%} of a {step_s * 1e3:.0f} ms step")


if __name__ == "__main__":
    main()
