"""The input pipeline for JPEG folders: images/s of each decoder alone and of training with it,
against synthetic data, on one device, in one run.

The folder holds crops of a real photograph (matplotlib's grace_hopper.jpg) scaled to
ImageNet-like sizes (375-500 px a side) and saved as JPEG quality 90, made by this script.

- pipeline alone, batches made back to back: `decoder: torchvision` and `decoder: pil` (in
  `--loader-workers` DataLoader processes; pil is the plain torchvision ImageFolder +
  DataLoader reference), and on cuda `decoder: nvjpeg` (distrib/jpeg.py), with the time of
  its stages (a loader process's reads and crop draws, the batched decode, the canvas and
  roi_align) for one batch;
- training: one replica per decoder and one on synthetic data, each warmed up (so loader
  queues filled during warm-up are drained), then timed over `--rounds` segments; images/s
  from the driver's wall time.

    python bench/gpu_data.py [--images 4096] [--rounds 2] [--json out.json]
    python bench/gpu_data.py --device cpu --image-size 64 --batch 32 --skip-training   # the CPU path
    python bench/gpu_data.py --device cpu --quick     # a smoke run of the script itself

Goal (H100/H200, 224 px, batch 256, bf16, channels_last): JPEG / synthetic >= 0.90 (stretch 0.95).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distrib import Orchestrator, RunConfig  # noqa: E402
from distrib.data import ShardSource  # noqa: E402
from distrib.jpeg import JpegShardSource, _decode  # noqa: E402
from tests.photos import write_photos  # noqa: E402

CHUNK = 64
PLAIN = "plain ImageFolder + DataLoader"


def _write_chunk(args: tuple[str, int, tuple[int, int]]) -> None:
    root, first, sizes = args
    write_photos(Path(root), per_class=CHUNK // 2, seed=first, sizes=sizes, first_index=first)


def make_folder(root: Path, images: int, sizes: tuple[int, int]) -> Path:
    chunks = [(str(root), first, sizes) for first in range(0, images // 2, CHUNK // 2)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.map(_write_chunk, chunks)
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pipeline_rate(source, *, steps: int, batch_size: int, device: torch.device, warmup: int) -> float:
    """images/s of `source.batch` back to back, after `warmup` batches: loader processes all
    start on a batch at once, so the first batches come faster than the steady state."""
    try:
        for step in range(warmup):
            source.batch(step)
        sync(device)
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            images, _ = source.batch(step)
        images.sum().item()
        sync(device)
        return steps * batch_size / (time.perf_counter() - start)
    finally:
        source.close()


def plain_rate(folder: Path, *, image_size: int, batch_size: int, workers: int, steps: int, warmup: int,
               device: torch.device) -> float:
    """images/s of the reference a user would write: torchvision's ImageFolder with the standard
    float transforms in a DataLoader, batches moved to the device (after `warmup` batches)."""
    from torchvision.transforms import v2

    from distrib.data import IMAGENET_MEAN, IMAGENET_STD

    transform = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(image_size, antialias=True),
                            v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    # as many batches as asked for, past the end of an epoch (warm-up can be longer than one)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=(warmup + steps) * batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         drop_last=True, pin_memory=device.type == "cuda")
    batches = iter(loader)
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        images, _ = next(batches)
        images = images.to(device, non_blocking=True)
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def nvjpeg_stages(source: JpegShardSource, device: torch.device, repeats: int = 3) -> dict:
    """Milliseconds per batch of the nvjpeg path's stages, run one after another (best of `repeats`):
    a loader process's item (file reads, frame headers, crop draws) made here on one core, the
    batched decode, the crops onto the canvas and roi_align, and decode-to-batch as the replica runs it."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        times = {}
        start = time.perf_counter()
        batch = source._dataset[0]
        times["loader_item_one_core_ms"] = time.perf_counter() - start
        start = time.perf_counter()
        ends = batch.offsets
        decoded = _decode([batch.data[a:b] for a, b in zip(ends[:-1], ends[1:])], batch.paths, device)
        sync(device)
        times["decode_ms"] = time.perf_counter() - start
        start = time.perf_counter()
        source._crop(decoded, batch.regions, batch.boxes.to(device))
        sync(device)
        times["crop_resize_ms"] = time.perf_counter() - start
        start = time.perf_counter()
        source.decode_and_augment(batch)
        sync(device)
        times["decode_and_augment_ms"] = time.perf_counter() - start
        best = {k: min(v * 1e3, best.get(k, math.inf)) for k, v in times.items()}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loader-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script itself")
    parser.add_argument("--skip-training", action="store_true", help="the pipeline alone")
    parser.add_argument("--decoders", help="a comma-separated subset of torchvision,pil,nvjpeg (default: all)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    image_size, batch, steps, sizes = args.image_size, args.batch, 100, (375, 500)
    images = args.images
    if args.quick:
        image_size, batch, steps, sizes, images = 64, 8, 4, (64, 120), 64
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    results: dict = {"device": name, "torch": torch.__version__, "image_size": image_size, "batch_size": batch,
                     "loader_workers": args.loader_workers}
    decoders = ["torchvision", "pil"] + (["nvjpeg"] if args.device == "cuda" else [])
    decoders = [d for d in decoders if args.decoders is None or d in args.decoders.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        folder = make_folder(Path(tmp) / "jpegs", images, sizes)
        took = time.perf_counter() - started
        print(f"{images} JPEGs of {sizes[0]}-{sizes[1]} px written in {took:.1f} s", flush=True)
        base = RunConfig(num_workers=1, device=args.device, data="folder", data_dir=str(folder), num_classes=2,
                         batch_size_per_worker=batch, image_size=image_size, steps=10_000,
                         loader_workers=args.loader_workers)
        alone = {}
        for decoder in decoders:
            cfg = base.replace(decoder=decoder)
            source = (JpegShardSource if decoder == "nvjpeg" else ShardSource)(cfg, shard=0, device=device)
            warmup = 2 * args.loader_workers + 2  # every loader process has made a batch or two
            alone[decoder] = pipeline_rate(source, steps=max(4, steps // 4), batch_size=batch, device=device,
                                           warmup=warmup)
        if "torchvision" in decoders:
            alone[PLAIN] = plain_rate(
                folder, image_size=image_size, batch_size=batch, workers=args.loader_workers,
                steps=max(4, steps // 4), warmup=2 * args.loader_workers + 2, device=device)
        results["pipeline_alone"] = alone
        print(f"pipeline alone, {name}, {image_size} px, batch {batch}, {args.loader_workers} loader workers: "
              + ", ".join(f"{d if d == PLAIN else 'decoder ' + d} {r:.0f} img/s" for d, r in alone.items())
              + (f"; torchvision / plain {alone['torchvision'] / alone[PLAIN]:.2f}" if PLAIN in alone else ""),
              flush=True)
        if "nvjpeg" in decoders or args.quick:  # the stages run on the cpu too (libjpeg-turbo), to check the script
            source = JpegShardSource(base.replace(decoder="nvjpeg", device="cuda"), shard=0, device=device)
            results["nvjpeg_stages_ms"] = nvjpeg_stages(source, device)
            source.close()
            print("nvjpeg stages per batch: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                          results["nvjpeg_stages_ms"].items()), flush=True)
        if not args.skip_training:
            results["training"] = train_rounds(args, base, decoders=[d for d in decoders if d != "pil"],
                                               steps=steps, tmp=tmp)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def train_rounds(args, base: RunConfig, *, decoders: list[str], steps: int, tmp: str) -> dict:
    """images/s of training on synthetic data and with each decoder: each run warmed up, then
    `rounds` timed segments."""
    ray.init(include_dashboard=False, logging_level="WARNING")
    cuda = args.device == "cuda"
    per_call = 10 if not args.quick else 2
    common = dict(channels_last=True, steps_per_call=per_call, check_every=0, checkpoint_every=0,
                  cpus_per_worker=float(os.cpu_count() or 2) if cuda else 1.0)
    kinds = [("synthetic", base.replace(data="synthetic", **common))]
    kinds += [(decoder, base.replace(decoder=decoder, **common)) for decoder in decoders]
    rates: dict[str, list[float]] = {}
    try:
        for kind, cfg in kinds:
            with Orchestrator(cfg.replace(run_dir=f"{tmp}/{kind.replace(' ', '-')}"), progress=False) as orch:
                # warm-up: cuDNN autotuning, the caching allocator, and loader queues drained
                orch.train(per_call * max(4, 2 * args.loader_workers // per_call + 2))
                for _ in range(args.rounds):
                    segment = orch.train(steps)
                    rates.setdefault(kind, []).append(steps * base.batch_size_per_worker /
                                                      sum(m.wall_s for m in segment))
            print(f"training, {kind}: " + ", ".join(f"{r:.0f}" for r in rates[kind]) + " img/s", flush=True)
    finally:
        ray.shutdown()
    synthetic = max(rates["synthetic"])
    summary = {"rates": rates, "over_synthetic": {d: max(rates[d]) / synthetic for d in decoders}}
    print(f"| data | img/s (best of {args.rounds}) | / synthetic |\n| --- | --- | --- |\n"
          f"| synthetic | {synthetic:.0f} | 1 |\n" +
          "\n".join(f"| JPEG, decoder: {d} | {max(rates[d]):.0f} | {summary['over_synthetic'][d]:.3f} |"
                    for d in decoders), flush=True)
    return summary


if __name__ == "__main__":
    main()
