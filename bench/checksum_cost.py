"""What a consistency check's checksums cost the thread that launches the steps: the per-tensor
device checksum (six kernels per tensor) against the fused one (a few per element size), on
resnet18's state (62 parameters, 62 momentum buffers, 60 BatchNorm buffers).

On a GPU the step thread launches every kernel, so each small launch is time the next step's
launches wait for. Two figures, each the median of --repeats, both methods alternating:
- `host`: the time to issue the checksums, the values left on the device (no synchronisation);
- `total`: the time until the values are on the host (on a CPU, both are the compute).
`--tiny` uses one-element tensors of the same count, so what is left is the launch overhead
alone, which this CPU can show for a GPU's sake.

    python bench/checksum_cost.py --tiny                 # the launches' host cost, on this CPU
    python bench/checksum_cost.py --device cuda           # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from distrib.digest import device_checksum, device_checksums


def resnet18_state(device: str, tiny: bool) -> list[torch.Tensor]:
    """Parameters, momentum-sized copies and buffers of resnet18, as a check sees them."""
    model = torchvision.models.resnet18().to(device=device, memory_format=torch.channels_last)
    params = [p.detach() for p in model.parameters()]
    tensors = params + [torch.zeros_like(p) for p in params] + list(model.buffers())
    if tiny:
        tensors = [t.reshape(-1)[:1].clone() for t in tensors]
    return tensors


def timed(run, device: str) -> tuple[float, float]:
    """(seconds to issue, seconds until the values are on the host)."""
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    values = run()
    issued = time.perf_counter()
    values.tolist()
    return issued - started, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="one-element tensors: the launch overhead alone")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    tensors = resnet18_state(args.device, args.tiny)
    methods = {"per tensor": lambda: torch.stack([device_checksum(t) for t in tensors]),
               "fused": lambda: device_checksums(tensors)}
    assert methods["per tensor"]().tolist() == methods["fused"]().tolist()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, run in methods.items():
            times[name].append(timed(run, args.device))
    medians = {name: [statistics.median(t[i] for t in runs) for i in (0, 1)] for name, runs in times.items()}
    print(f"{len(tensors)} tensors{' of one element' if args.tiny else ''} on {args.device}, "
          f"median of {args.repeats}:")
    for name, (host, total) in medians.items():
        print(f"  {name:10s} host {host * 1e3:7.2f} ms   total {total * 1e3:7.2f} ms")
    (host_old, total_old), (host_new, total_new) = medians["per tensor"], medians["fused"]
    print(f"fused / per tensor: host {host_new / host_old:.3f}, total {total_new / total_old:.3f}")


if __name__ == "__main__":
    main()
