"""The reference: a plain torchrun + DDP script, as a user would write it without distrib.

    torchrun --nproc-per-node 2 -m distrib.torchrun_baseline --steps 30 --batch-size 32 --image-size 64

Used by bench/core_throughput.py and by `distrib scale --baseline torchrun`. Rank 0
prints one JSON line: images/s over the steps after `--warmup`, and the seconds from
process start to the end of the first step. It is deliberately plain (DDP defaults,
its own random batch per rank), so it stays the tool a user would otherwise use.
"""

import argparse
import json
import os
import time

START = time.time()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torchvision  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1, help="steps not timed")
    parser.add_argument("--backend", default="gloo")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    model = DDP(torchvision.models.resnet18(num_classes=args.num_classes).to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator(device=device).manual_seed(rank)
    first_step_done = timed_from = None
    if not 1 <= args.warmup < args.steps:
        parser.error('--warmup must be in [1, steps)')
    for step in range(args.steps):
        images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=gen, device=device)
        labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen, device=device)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        if step == 0:
            first_step_done = time.time()
        if step == args.warmup - 1:
            timed_from = time.perf_counter()
    elapsed = time.perf_counter() - timed_from
    if rank == 0:
        print(json.dumps({"images_per_s": (args.steps - args.warmup) * args.batch_size * world / elapsed,
                          "first_step_s": first_step_done - START}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
