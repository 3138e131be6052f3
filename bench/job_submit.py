"""Seconds from `ray job submit` to the job's first finished step, on a local multi-node cluster.

Starts deploy/local-cluster.sh (a head and 2 worker nodes of 1 CPU on this machine),
submits `distrib train` (2 CPU workers, SPREAD, 64 px, batch 32) with deploy/submit.sh
`--rounds` times, and prints each time and the best; stops the cluster at the end.

    .venv/bin/python bench/job_submit.py [--rounds 3]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_ADDRESS": "http://127.0.0.1:8265"}
    script = str(REPO / "deploy" / "local-cluster.sh")
    subprocess.run([script, "start", "2", "1"], env=env, check=True, capture_output=True)
    times = []
    try:
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                submitted = time.time()
                subprocess.run([str(REPO / "deploy" / "submit.sh"), "--config", "configs/local.yaml",
                                "--set", "steps=5", "--set", "placement_strategy=SPREAD",
                                "--set", f"run_dir={tmp}/run"], env=env, check=True, capture_output=True)
                first = json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[0])
                times.append(first["finished_at"] - submitted)
                print(f"ray job submit -> first finished step: {times[-1]:.1f} s", flush=True)
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True)
    print(f"best of {args.rounds}: {min(times):.1f} s (median {sorted(times)[len(times) // 2]:.1f} s)")


if __name__ == "__main__":
    main()
