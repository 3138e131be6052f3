"""distrib against a bare PyTorch training loop on one GPU, same settings, one run.

World size 1 (NCCL cannot put two ranks on one GPU). For each workload the bare
loop (in this process) and distrib (one Ray actor, driven call by call) train
resnet18 on synthetic data made on the GPU, with bf16 autocast, channels_last
and cuDNN autotuning; warm-up steps are not timed. Rounds alternate the two on one
warm distrib run; the best of each and the median of the per-round ratios are printed.
Also runs the tutorial's step (1 image, 64 px, fp32) through distrib and plainly, and
prints both losses.

    python bench/gpu_step.py [--rounds 4] [--only 64] [--json results.json]
    python bench/gpu_step.py --defaults               # with configs/gpu.yaml's checks and snapshots
    python bench/gpu_step.py --compile --only 224     # both sides torch.compile'd (compile: true)
    python bench/gpu_step.py --device cpu --quick     # a smoke run of the script itself

Targets: 224 px / batch 256: distrib / bare >= 0.98; 64 px / batch 32: >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
import torch
import torchvision

from distrib import Orchestrator, RunConfig, config
from distrib.tutorial import seed_step


def bare_loop(*, device: str, image_size: int, batch_size: int, precision: str, warmup: int, steps: int,
              compile: bool = False) -> float:
    """images/s of the loop a user would write by hand with the same settings (`compile`: the
    model torch.compile'd, compiled in the warm-up)."""
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    fmt = torch.channels_last
    model = torchvision.models.resnet18().to(device, memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compile else model
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    for i in range(warmup + steps):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        images = torch.rand(batch_size, 3, image_size, image_size, generator=gen, device=device)
        images = images.contiguous(memory_format=fmt)
        labels = torch.randint(0, 1000, (batch_size,), generator=gen, device=device)
        with torch.autocast(device, dtype=dtype, enabled=precision != "fp32"):
            outputs = forward(images)
        loss = torch.nn.functional.cross_entropy(outputs.float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss.item()  # waits for the last step
    elapsed = time.perf_counter() - start
    del model, forward, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return steps * batch_size / elapsed


def compare(*, device: str, image_size: int, batch_size: int, precision: str, steps: int, steps_per_call: int,
            rounds: int, check_every: int = 0, checkpoint_every: int = 0,
            compile: bool = False) -> list[tuple[float, float]]:
    """(bare images/s, distrib images/s) per round. One distrib run serves every round, so
    rounds alternate the two without restarts; distrib's figure is the driver's wall time
    for the round's steps (Ray calls included), after a warm-up call. With snapshots the warm-up
    is half a snapshot interval, so each round's snapshot falls mid-round, with steps queued
    behind it, as in a long run (at a round's end nothing would overlap the driver's hand-over)."""
    warmup = steps_per_call
    if checkpoint_every:
        warmup = max(steps_per_call, checkpoint_every // 2 // steps_per_call * steps_per_call)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(num_workers=1, device=device, batch_size_per_worker=batch_size, image_size=image_size,
                        precision=precision, channels_last=True, steps=warmup + rounds * steps,
                        steps_per_call=steps_per_call, run_dir=f"{tmp}/run",
                        # 0, 0: time training alone, as the bare loop neither checks nor checkpoints;
                        # --defaults: as configs/gpu.yaml runs, each round holding one snapshot
                        check_every=check_every, checkpoint_every=checkpoint_every, compile=compile)
        pairs = []
        with Orchestrator(cfg, progress=False) as orch:
            orch.train(warmup)  # cuDNN autotuning, the caching allocator
            for _ in range(rounds):
                bare = bare_loop(device=device, image_size=image_size, batch_size=batch_size, precision=precision,
                                 warmup=steps_per_call, steps=steps, compile=compile)
                segment = orch.train(steps)
                ours = steps * batch_size / sum(m.wall_s for m in segment)
                pairs.append((bare, ours))
                # A call's steps share its wall time: a call holding a pause stands out. Its first
                # step says which boundary it follows: a check (check_every) or a snapshot
                # (checkpoint_every; the first step of a resumed count is 0).
                calls = sorted((m.wall_s * steps_per_call, m.step) for m in segment[::steps_per_call])
                median = calls[len(calls) // 2][0]
                slowest = ", ".join(f"{(t - median) * 1e3:.0f} ms at step {step}" for t, step in calls[::-1][:3])
                pause = (f", calls of {steps_per_call} steps over the median ({median * 1e3:.0f} ms): {slowest} "
                         f"(a step {1e3 * batch_size / ours:.1f} ms; checks every {check_every}, "
                         f"a snapshot every {checkpoint_every})" if checkpoint_every else "")
                print(f"{image_size} px, batch {batch_size}: bare {bare:9.1f} img/s, distrib {ours:9.1f} img/s, "
                      f"ratio {ours / bare:.3f}{pause}", flush=True)
        return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--only", type=int, help="run only the workload of this image size")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script itself")
    parser.add_argument("--defaults", action="store_true",
                        help="distrib as configs/gpu.yaml runs it: its checks and snapshots on, a snapshot per round")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both (compile: true); each round compiles the bare loop anew")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    user = config.load(Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml") if args.defaults else None
    ray.init(include_dashboard=False, logging_level="WARNING")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    precision = "bf16" if args.device == "cuda" else "fp32"
    # (image size, batch, timed steps, steps per distrib call; the first call is the warm-up)
    workloads = [(224, 256, 100, 10), (64, 32, 600, 20)]
    if args.quick:
        workloads = [(64, 8, 6, 2), (32, 4, 6, 3)]
    results = []
    for image_size, batch_size, steps, per_call in workloads:
        if args.only and image_size != args.only:
            continue
        checks = {}
        if user is not None:  # rounds as long as the snapshot interval, so each holds one
            quick = args.quick
            steps = user.checkpoint_every if not quick else 4
            per_call = user.steps_per_call if not quick else 2
            checks = {"check_every": user.check_every if not quick else 2, "checkpoint_every": steps}
        pairs = compare(device=args.device, image_size=image_size, batch_size=batch_size, precision=precision,
                        steps=steps, steps_per_call=per_call, rounds=args.rounds, compile=args.compile, **checks)
        ratios = sorted(ours / bare for bare, ours in pairs)
        results.append({"gpu": gpu, "defaults": args.defaults, "compile": args.compile, **checks,
                        "image_size": image_size, "batch_size": batch_size, "precision": precision,
                        "channels_last": True, "steps_per_call": per_call, "rounds": pairs,
                        "bare_images_per_s": max(b for b, _ in pairs), "distrib_images_per_s": max(o for _, o in pairs),
                        "best_ratio": max(o for _, o in pairs) / max(b for b, _ in pairs),
                        "median_ratio": ratios[len(ratios) // 2]})
    tutorial = seed_step(seed=0, device=args.device)
    print(f"\n{gpu}, torch {torch.__version__}, {args.rounds} rounds{', compiled' if args.compile else ''}:")
    print("| image px | batch | bare loop img/s (best) | distrib img/s (best) | best / best | median of round ratios |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['image_size']} | {r['batch_size']} | {r['bare_images_per_s']:.0f} | "
              f"{r['distrib_images_per_s']:.0f} | {r['best_ratio']:.3f} | {r['median_ratio']:.3f} |")
    print(f"tutorial step: loss through distrib {tutorial.distrib_loss!r}, plain {tutorial.plain_loss!r}, "
          f"largest parameter difference {tutorial.max_param_diff!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workloads": results, "tutorial": tutorial.__dict__, "torch": torch.__version__}, f, indent=2)
    ray.shutdown()


if __name__ == "__main__":
    main()
