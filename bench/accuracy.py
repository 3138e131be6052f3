"""Accuracy against a reference, the cost of evaluation, and a time-to-accuracy sweep, on real images.

Data: scikit-learn's digits (1,797 images, 10 classes) as an ImageFolder at 32 px, 20% of
each class held out (359 images). Recipe: resnet18, global batch 32, SGD momentum 0.9,
lr 0.1 with 10 warm-up steps and a cosine decay, no augmentation (the standard
random-resized crop keeps as little as 8% of an 8x8 digit), an evaluation every 25 steps.

- distrib, 2 CPU workers x batch 16 (gloo), against a plain single-process PyTorch loop
  with the same recipe: the same global batches in the same order (distrib.data's
  sampler), the same learning rate per step, the same held-out set, 2 torch threads
  (the CPUs the two replicas get). Prints held-out top-1 for both, the seconds to a
  top-1 of 0.95 (from the first step, evaluations included) and the mean time of one
  evaluation of the 359 images.
- `distrib scale` with target_top1 0.95 over 1 and 2 workers: its table and how long it took.

    .venv/bin/python bench/accuracy.py [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.digits, from a checkout

from distrib import Orchestrator, RunConfig, evaluation  # noqa: E402
from distrib.data import dataset_indices, held_out_dataset, shard_positions, training_dataset  # noqa: E402
from distrib.scale import SweepConfig, run_sweep  # noqa: E402
from distrib.scale_report import format_table  # noqa: E402
from distrib.schedule import lr_at  # noqa: E402
from tests.digits import write_digits  # noqa: E402

TARGET = 0.95


def recipe(data_dir: Path, run_dir: Path, steps: int) -> RunConfig:
    return RunConfig(num_workers=2, device="cpu", data="folder", data_dir=str(data_dir), num_classes=10,
                     image_size=32, batch_size_per_worker=16, steps=steps, lr=0.1, warmup_steps=10,
                     lr_schedule="cosine", val_fraction=0.2, eval_every=25, augment="none", loader_workers=1,
                     checkpoint_every=0, check_every=25, channels_last=False, run_dir=str(run_dir))


def seconds_to(evals: list[tuple[int, float, float]], started: float) -> str:
    """evals: (step, top1, finished_at)."""
    hit = next((at for _, top1, at in evals if top1 >= TARGET), None)
    return f"{hit - started:.1f}" if hit is not None else "missed"


def run_distrib(cfg: RunConfig) -> dict:
    with Orchestrator(cfg, progress=False) as orch:
        started = time.time()
        orch.train()
        evals = [(e.step, e.top1, e.finished_at) for e in orch.evals]
        eval_s = sum(e.eval_s for e in orch.evals) / len(orch.evals)
        images_per_s = orch.summary()["images_per_s"]
    return {"final": evals[-1][1], "best": max(e[1] for e in evals), "to_target": seconds_to(evals, started),
            "eval_s": eval_s, "images_per_s": images_per_s}


def run_plain(cfg: RunConfig) -> dict:
    """The same recipe in one process: one model, the whole global batch, plain SGD."""
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    model = torchvision.models.resnet18(num_classes=cfg.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    train_set, held_out = training_dataset(cfg), held_out_dataset(cfg)
    loader = torch.utils.data.DataLoader(held_out, batch_size=64)
    batches = []
    for step in range(cfg.steps):
        positions = shard_positions(step=step, shard=0, batch_size_per_worker=cfg.global_batch_size,
                                    global_batch_size=cfg.global_batch_size)
        batches.append(list(zip(dataset_indices(positions, seed=cfg.seed, dataset_size=len(train_set)), positions)))
    train_loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=batches, num_workers=2))
    evals, eval_times, train_s = [], [], 0.0
    started = time.time()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        images, targets = next(train_loader)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t0
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            t1 = time.perf_counter()
            model.eval()
            counts = evaluation.evaluate(model, loader)
            model.train()
            eval_times.append(time.perf_counter() - t1)
            evals.append((step, counts["top1"] / counts["count"], time.time()))
    return {"final": evals[-1][1], "best": max(e[1] for e in evals), "to_target": seconds_to(evals, started),
            "eval_s": sum(eval_times) / len(eval_times), "images_per_s": cfg.global_batch_size * cfg.steps / train_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = write_digits(tmp / "digits")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        cfg = recipe(data_dir, tmp / "run", args.steps)
        ours = run_distrib(cfg)
        plain = run_plain(cfg)
        print(f"\n{args.steps} steps, global batch 32, 359 held-out images")
        print(f"| tool | final top-1 | best top-1 | seconds to top-1 {TARGET} | one evaluation (s) | train images/s |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, r in (("distrib, 2 workers", ours), ("plain loop, 1 process", plain)):
            print(f"| {name} | {r['final']:.4f} | {r['best']:.4f} | {r['to_target']} | {r['eval_s']:.2f} | "
                  f"{r['images_per_s']:.1f} |")
        print(f"top-1 difference: {100 * (ours['final'] - plain['final']):+.2f} points (goal: within 0.5)")
        print(f"evaluation time, distrib / plain: {ours['eval_s'] / plain['eval_s']:.2f}")

        sweep = SweepConfig(base=cfg.replace(run_dir="unused"), sweep={"num_workers": (1, 2)}, scaling="strong",
                            global_batch_size=32, target_top1=TARGET, out_dir=str(tmp / "sweep"))
        started = time.perf_counter()
        _, rows = run_sweep(sweep, say=lambda text: print(text, flush=True))
        print(f"\ntime-to-accuracy sweep ({time.perf_counter() - started:.0f} s in all):")
        print(format_table(rows))
        ray.shutdown()


if __name__ == "__main__":
    main()
