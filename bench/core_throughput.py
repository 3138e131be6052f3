"""distrib against a plain torchrun + DDP script, same workload, same machine, one run.

Workload: resnet18, 64 px, 32 images per worker, 2 workers, gloo on the CPU,
cross-entropy, SGD with momentum. Each side runs `--rounds` times, alternating,
so drift in the machine's load hits both; the best round of each is compared.

Prints, for each: images/s (after the first step) and seconds from command
start to the first finished step (distrib's includes starting a local Ray).
Targets: images/s ratio >= 1.0; distrib's time to first step <= 10 s.

    .venv/bin/python bench/core_throughput.py [--steps 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_torchrun(args) -> dict:
    done = subprocess.run(
        [str(BIN / "torchrun"), "--nproc-per-node", str(args.workers), "--master-port", "29533",
         "-m", "distrib.torchrun_baseline", "--steps", str(args.steps),
         "--batch-size", str(args.batch_size), "--image-size", str(args.image_size)],
        capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_distrib(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        start = time.time()
        subprocess.run(
            [str(BIN / "distrib"), "train", "--config", str(REPO / "configs" / "local.yaml"), "--no-progress",
             "--set", f"num_workers={args.workers}", "--set", f"steps={args.steps}",
             "--set", f"batch_size_per_worker={args.batch_size}", "--set", f"image_size={args.image_size}",
             "--set", f"run_dir={run_dir}",
             # the torchrun script writes no checkpoints; consistency checks stay on (every 10 steps)
             "--set", "checkpoint_every=0"],
            capture_output=True, text=True, check=True, env=env)
        first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        summary = json.loads((run_dir / "summary.json").read_text())
    return {"images_per_s": summary["images_per_s"], "first_step_s": first["finished_at"] - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    results: dict[str, list[dict]] = {"torchrun": [], "distrib": []}
    for round_index in range(args.rounds):
        for name, runner in (("torchrun", run_torchrun), ("distrib", run_distrib)):
            result = runner(args)
            results[name].append(result)
            print(f"round {round_index + 1} {name:8s}: {result['images_per_s']:7.1f} images/s, "
                  f"first step after {result['first_step_s']:.1f} s", flush=True)
    best = {name: max(r["images_per_s"] for r in rs) for name, rs in results.items()}
    first = {name: min(r["first_step_s"] for r in rs) for name, rs in results.items()}
    print(f"\nbest of {args.rounds}: torchrun {best['torchrun']:.1f} images/s, distrib {best['distrib']:.1f} images/s")
    print(f"distrib / torchrun images/s: {best['distrib'] / best['torchrun']:.3f}  (target >= 1.0)")
    print(f"command start to first finished step: distrib {first['distrib']:.1f} s (target <= 10 s), "
          f"torchrun {first['torchrun']:.1f} s")


if __name__ == "__main__":
    main()
