"""Why training on JPEGs (decoder: nvjpeg) is slower than on synthetic data: what the input
pipeline's stages take from a training step that runs beside them on the same GPU.

A bare resnet18 loop (bf16, channels_last, 224 px, batch 256, synthetic data) is timed alone,
then while a second thread runs one stage of the nvjpeg path (distrib/jpeg.py) over and over
on its own stream, as the replica's prefetch thread does: the whole preparation, the batched
decode alone, or the canvas and roi_align alone. Each stage's thread CPU time against its
wall time, alone, tells CPU-bound (or GIL-holding) work from GPU work. Last, the same bare
loop trained on batches from the pipeline itself (JpegShardSource: its loader processes and
prefetch thread, as in a replica) against synthetic data, rounds interleaved: the JPEG
path's ratio without Ray or the driver.

(A canvas made by jpeg.gather_canvas under torch.compile was measured here on an H200 and
taken out: it cost the step more than the eager one beside it, 0.53 against 0.68, and fed
training no faster, 0.631 and 0.618 of synthetic against 0.637 and 0.603.)

    python bench/gpu_data_overlap.py [--images 1024] [--rounds 2]
    python bench/gpu_data_overlap.py --device cpu --quick   # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpu_data import make_folder  # noqa: E402
from distrib import RunConfig  # noqa: E402
from distrib.jpeg import JpegShardSource, _decode  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_rate(device: torch.device, *, image_size: int, batch: int, steps: int, batches=None,
                  warmup: int = 3) -> float:
    """images/s of a bare training loop: on one synthetic batch made once, outside the timing, or
    on `batches(step)` (images, labels) when given; timed after `warmup` steps."""
    fmt = torch.channels_last
    model = torchvision.models.resnet18().to(device, memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    synthetic = (torch.rand(batch, 3, image_size, image_size, device=device).contiguous(memory_format=fmt),
                 torch.randint(0, 1000, (batch,), device=device))
    for step in range(steps + warmup):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        images, labels = synthetic if batches is None else batches(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(images.contiguous(memory_format=fmt)).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def stages(source: JpegShardSource, items: list, device: torch.device) -> dict:
    """Each stage as a function of the item number (what the background thread repeats)."""
    decoded = [decode(source, item, device) for item in items]
    boxes = [item.boxes.to(device) for item in items]
    return {
        "whole preparation": lambda i: source.decode_and_augment(items[i % len(items)]),
        "batched decode": lambda i: decode(source, items[i % len(items)], device),
        "canvas + roi_align": lambda i: source._crop(decoded[i % len(items)], items[i % len(items)].regions,
                                                     boxes[i % len(items)]),
    }


def fed_by_pipeline(cfg: RunConfig, device: torch.device, *, rounds: int, **train) -> None:
    """The bare loop trained on synthetic data and on batches from JpegShardSource (its loader
    processes and prefetch thread, as in a replica), rounds interleaved; prints images/s and
    the ratio to synthetic of the same round."""
    source = JpegShardSource(cfg, shard=0, device=device)
    next_step = 0
    print("| round | synthetic img/s | JPEG img/s | / synthetic |\n| --- | --- | --- | --- |")
    try:
        for round_index in range(rounds):
            synthetic = training_rate(device, **train)
            warmup = 2 * cfg.loader_workers + 2 if round_index == 0 else 3  # loader queues drained first
            first = next_step
            rate = training_rate(device, warmup=warmup, batches=lambda step, f=first: source.batch(f + step),
                                 **train)
            next_step = first + warmup + train["steps"]
            print(f"| {round_index + 1} | {synthetic:.0f} | {rate:.0f} | {rate / synthetic:.3f} |", flush=True)
    finally:
        source.close()


def decode(source: JpegShardSource, item, device: torch.device) -> list[torch.Tensor]:
    ends = item.offsets
    return _decode([item.data[a:b] for a, b in zip(ends[:-1], ends[1:])], item.paths, device)


def alone(stage, device: torch.device, repeats: int = 5) -> tuple[float, float]:
    """(wall ms, this thread's CPU ms) per run of `stage`, synchronised, best of `repeats`."""
    wall, cpu = float("inf"), float("inf")
    for i in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        stage(i)
        sync(device)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.thread_time() - start_cpu)
    return wall * 1e3, cpu * 1e3


def beside(stage, device: torch.device, **train) -> tuple[float, float]:
    """(training images/s, stage runs/s) with `stage` repeated on a side stream in a thread."""
    stop, done = threading.Event(), [0]
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def repeat() -> None:
        while not stop.is_set():
            if stream is not None:
                with torch.cuda.stream(stream):
                    stage(done[0])
                stream.synchronize()
            else:
                stage(done[0])
            done[0] += 1

    thread = threading.Thread(target=repeat, daemon=True)
    start = time.perf_counter()
    thread.start()
    rate = training_rate(device, **train)
    stop.set()
    thread.join()
    return rate, done[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the training fed by the pipeline")
    parser.add_argument("--loader-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    size, batch, steps, fed_steps, sizes, images = 224, 256, 40, 80, (375, 500), args.images
    if args.quick:
        size, batch, steps, fed_steps, sizes, images = 64, 8, 3, 3, (64, 120), 64
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train = dict(image_size=size, batch=batch, steps=steps)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "jpegs", images, sizes)
        cfg = RunConfig(num_workers=1, device="cuda", data="folder", data_dir=str(folder), num_classes=2,
                        batch_size_per_worker=batch, image_size=size, steps=100, loader_workers=0, decoder="nvjpeg")
        source = JpegShardSource(cfg, shard=0, device=device)
        items = [source.encoded(step) for step in range(4)]
        runs = stages(source, items, device)
        training_rate(device, **train)  # warm-up: cuDNN autotuning
        reference = training_rate(device, **train)
        print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {size} px, batch {batch}: "
              f"training alone {reference:.0f} img/s")
        print("| stage | alone: wall ms | alone: CPU ms | training beside it, img/s | / alone | stage runs/s beside |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, stage in runs.items():
            wall, cpu = alone(stage, device)
            rate, stage_rate = beside(stage, device, **train)
            print(f"| {name} | {wall:.1f} | {cpu:.1f} | {rate:.0f} | {rate / reference:.3f} | {stage_rate:.1f} |",
                  flush=True)
        source.close()
        fed_by_pipeline(cfg.replace(loader_workers=args.loader_workers, steps=1_000_000), device,
                        rounds=args.rounds, **dict(train, steps=fed_steps))


if __name__ == "__main__":
    main()
