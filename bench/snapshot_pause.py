"""What a snapshot costs the replicas: the time lost around each one, against the median call.

One replica trains resnet18 (1000 classes: a ~94 MB snapshot with momentum) with a snapshot
every `--every` steps (a consistency check at each, none between) and no other pause. For
each snapshot after step s, the calls from step s on through `--window` calls are summed and
as many median calls are taken off: the time the replica lost to the snapshot, wherever the
driver's clock puts it (a call that waited shows long, the next one short when it had run
meanwhile). The goal of issue #11: no longer than one step.

    python bench/snapshot_pause.py [--checks-only]       # cpu, 32 px, batch 8
    python bench/snapshot_pause.py --device cuda --image-size 224 --batch 256 --steps-per-call 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import ray

from distrib import Orchestrator, RunConfig


def pauses(wall_by_call: list[tuple[int, float]], snapshot_steps: list[int], window: int) -> list[float]:
    """Seconds lost after each snapshot step: the `window` calls from it, less as many median calls."""
    median = statistics.median(wall for _, wall in wall_by_call)
    lost = []
    for step in snapshot_steps:
        after = [wall for first, wall in wall_by_call if first >= step][:window]
        if len(after) == window:
            lost.append(sum(after) - window * median)
    return lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps-per-call", type=int, default=1)
    parser.add_argument("--every", type=int, default=20, help="steps between snapshots")
    parser.add_argument("--snapshots", type=int, default=6)
    parser.add_argument("--window", type=int, default=6, help="calls summed after each snapshot")
    parser.add_argument("--checks-only", action="store_true",
                        help="the consistency checks alone at the same steps (no snapshot): their share")
    args = parser.parse_args()
    ray.init(include_dashboard=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        warmup = args.every // 2  # the first snapshot lands mid-run, not at the first call
        cfg = RunConfig(num_workers=1, device=args.device, image_size=args.image_size,
                        batch_size_per_worker=args.batch, steps_per_call=args.steps_per_call,
                        steps=warmup + args.every * args.snapshots + args.window * args.steps_per_call,
                        checkpoint_every=0 if args.checks_only else args.every, check_every=args.every,
                        run_dir=f"{tmp}/run")
        with Orchestrator(cfg, progress=False) as orch:
            orch.train(warmup)
            metrics = orch.train()
    calls = [(m.step, m.wall_s * args.steps_per_call) for m in metrics[::args.steps_per_call]]
    snapshot_steps = [s for s in range(args.every, cfg.steps, args.every) if s > warmup]
    lost = pauses(calls, snapshot_steps, args.window)
    median = statistics.median(wall for _, wall in calls)
    step_ms = 1e3 * median / args.steps_per_call
    what = "check" if args.checks_only else "snapshot"
    print(f"{args.device}, {args.image_size} px, batch {args.batch}, {args.steps_per_call} steps a call: "
          f"median call {1e3 * median:.1f} ms (a step {step_ms:.1f} ms); time lost per {what} "
          f"(the {args.window} calls from it, less as many median calls): "
          + ", ".join(f"{1e3 * s:.0f}" for s in lost) + f" ms; median {1e3 * statistics.median(lost):.0f} ms "
          f"= {1e3 * statistics.median(lost) / step_ms:.1f} steps")
    ray.shutdown()


if __name__ == "__main__":
    main()
