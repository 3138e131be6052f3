"""batchnorm: sync against train: what it costs per step, and what it buys (N workers == 1 worker).

Step time: two groups of `--workers` workers (gloo; on cuda, `--gpus-per-worker 0.25` puts
all four replicas of two groups on one GPU), one with `batchnorm: train` and one with
`batchnorm: sync`, live side by side on one local Ray; after a warm-up call each, rounds
alternate them (the order flips every round), so drift in the machine's load hits both.
Per round: each one's step time (driver wall time over the round's steps) and the ratio
sync / train. Target: sync / train <= 1.10 on CPU, 1.05 on a GPU (best against best and
the median of the round ratios are printed).

Agreement: for train, sync and frozen, 1 worker x (2 x batch) against 2 workers x batch
on the same global batch; the largest absolute parameter difference after 1 step and
after `--agreement-steps` steps (with sync, float32 rounding only; with train, the maths
differs). A last row gives the floor that rounding sets: one worker against itself with
only the memory layout changed (NCHW against the default channels_last).

    .venv/bin/python bench/syncbn.py                        # 64 px, batch 32, 2 workers, 3 rounds of 10 steps
    .venv/bin/python bench/syncbn.py --image-size 32 --batch-size 4 --rounds 1 --steps 2 --agreement-steps 2
                                                            # a smoke run of the script itself
    python bench/syncbn.py --device cuda --gpus-per-worker 0.25 --image-size 224 --batch-size 256 --only time
                                                            # one GPU: both groups of 2 share it (gloo)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import ray

from distrib import Orchestrator, RunConfig


def bench_cfg(args, run_dir: str, **changes) -> RunConfig:
    return RunConfig(num_workers=args.workers, device=args.device, gpus_per_worker=args.gpus_per_worker,
                     batch_size_per_worker=args.batch_size, image_size=args.image_size, run_dir=run_dir,
                     check_every=0, checkpoint_every=0, **changes)


def step_times(args, tmp: str) -> dict[str, list[float]]:
    """Seconds per step of each batchnorm mode, per round (the two groups alternate)."""
    modes = ("train", "sync")
    per_round: dict[str, list[float]] = {mode: [] for mode in modes}
    steps = args.steps_per_call + args.rounds * args.steps
    orchs = {mode: Orchestrator(bench_cfg(args, f"{tmp}/time-{mode}", batchnorm=mode, steps=steps),
                                progress=False) for mode in modes}
    try:
        for orch in orchs.values():
            orch.start()
            orch.train(args.steps_per_call)  # warm-up: oneDNN's first calls, the allocator
        for round_index in range(args.rounds):
            order = modes if round_index % 2 == 0 else modes[::-1]
            for mode in order:
                segment = orchs[mode].train(args.steps)
                per_round[mode].append(sum(m.wall_s for m in segment) / len(segment))
                forward = statistics.fmean(m.forward_s for m in segment)
                backward = statistics.fmean(m.backward_s for m in segment)
                print(f"round {round_index + 1} {mode:5s}: {per_round[mode][-1] * 1e3:7.1f} ms/step "
                      f"(forward {forward * 1e3:.1f} ms, backward + all-reduce {backward * 1e3:.1f} ms)", flush=True)
            print(f"round {round_index + 1} sync / train: {per_round['sync'][-1] / per_round['train'][-1]:.3f}",
                  flush=True)
    finally:
        for orch in orchs.values():
            orch.shutdown()
    return per_round


def parameters(state: dict) -> dict:
    """The model's trainable parameters (no running statistics) from an Orchestrator.state()."""
    model = state["model"]
    return {k: v for k, v in model.items() if "running_" not in k and "num_batches_tracked" not in k}


def max_abs_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def states_after(args, tmp: str, *, workers: int, batchnorm: str, channels_last: bool = True) -> tuple[dict, dict]:
    """Parameters after 1 step and after agreement_steps, for one global batch split over `workers`."""
    batch = args.workers * args.batch_size // workers
    cfg = bench_cfg(args, f"{tmp}/agree-{batchnorm}-{workers}-{channels_last}", batchnorm=batchnorm,
                    steps=args.agreement_steps, channels_last=channels_last)
    with Orchestrator(cfg.replace(num_workers=workers, batch_size_per_worker=batch), progress=False) as orch:
        orch.train(1)
        after_one = parameters(orch.state())
        orch.train()
        return after_one, parameters(orch.state())


def agreements(args, tmp: str) -> dict[str, tuple[float, float]]:
    """Rows of the agreement table: (after 1 step, after agreement_steps) largest |difference|."""
    rows, one_worker = {}, {}
    for mode in ("train", "sync", "frozen"):
        one_worker[mode] = states_after(args, tmp, workers=1, batchnorm=mode)
        many = states_after(args, tmp, workers=args.workers, batchnorm=mode)
        rows[mode] = tuple(max_abs_difference(m, o) for m, o in zip(many, one_worker[mode]))
    # The floor float32 rounding sets: one worker, the same maths, only the memory layout (so
    # the kernels and their order of summation) changed. train == sync on one worker.
    nchw = states_after(args, tmp, workers=1, batchnorm="train", channels_last=False)
    rows["1 worker NCHW vs NHWC (rounding alone)"] = tuple(
        max_abs_difference(a, b) for a, b in zip(nchw, one_worker["train"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--gpus-per-worker", type=float, default=1.0,
                        help="on cuda: 0.25 puts both groups of 2 workers on one GPU (gloo with CUDA tensors)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="images per worker")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and mode")
    parser.add_argument("--steps-per-call", type=int, default=2, help="warm-up steps, not timed")
    parser.add_argument("--agreement-steps", type=int, default=6)
    parser.add_argument("--only", choices=["time", "agreement"], help="run one half of the bench")
    args = parser.parse_args()
    # Both timing groups are placed at once: room for 2 x workers replicas of 1 CPU each.
    ray.init(num_cpus=2 * args.workers, include_dashboard=False, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            per_round = step_times(args, tmp) if args.only != "agreement" else None
            agree = agreements(args, tmp) if args.only != "time" else None
    finally:
        ray.shutdown()
    if per_round:
        print_times(args, per_round)
    if agree:
        print_agreement(args, agree)


def print_times(args, per_round: dict[str, list[float]]) -> None:
    ratios = sorted(s / t for s, t in zip(per_round["sync"], per_round["train"]))
    best = {mode: min(times) for mode, times in per_round.items()}
    where = "CPU" if args.device == "cpu" else f"GPU ({args.gpus_per_worker} GPU each)"
    print(f"\n{args.workers} {where} workers, {args.image_size} px, batch {args.batch_size}/worker, "
          f"{args.rounds} rounds of {args.steps} steps:")
    print(f"best step: train {best['train'] * 1e3:.1f} ms, sync {best['sync'] * 1e3:.1f} ms; "
          f"sync / train best against best {best['sync'] / best['train']:.3f}, "
          f"median of round ratios {statistics.median(ratios):.3f}  (target <= 1.10 on CPU, 1.05 on a GPU)")


def print_agreement(args, agree: dict[str, tuple[float, float]]) -> None:
    print(f"\nmax |parameter difference|, {args.workers} workers x {args.batch_size} vs 1 worker x "
          f"{args.workers * args.batch_size}:")
    print(f"| batchnorm | after 1 step | after {args.agreement_steps} steps |")
    print("| --- | --- | --- |")
    for mode, (first, last) in agree.items():
        print(f"| {mode} | {first:.2e} | {last:.2e} |")


if __name__ == "__main__":
    main()
