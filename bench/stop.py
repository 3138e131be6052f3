"""A graceful stop and what it costs: SIGTERM to a running `distrib train`, then --resume.

Runs the README's default job (configs/local.yaml: 2 CPU workers, resnet18 at 64 px,
batch 32 per worker, gloo, a checkpoint every 20 steps) on a local Ray instance it
starts once, sends SIGTERM after a few steps, and measures:
- seconds from SIGTERM to the line that names the checkpoint written (the calls in flight
  finished, checked, snapshot, written and fsynced) and to the driver's exit (the replicas
  and Ray released), next to the step time (the goal: within one step plus the checkpoint
  write);
- the steps the resumed run redoes (the goal: 0): the resumed run's first step minus the
  steps the stopped run had finished.
Each round runs the stop and the resume; rounds repeat to show the spread.

    .venv/bin/python bench/stop.py [--rounds 3] [--after-steps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parents[1]


def train(run_dir: Path, address: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "distrib", "train", "--address", address, *extra]
    if "--resume" not in extra:
        command += ["--config", str(REPO / "configs" / "local.yaml"), "--set", f"run_dir={run_dir}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def steps_done(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def one_round(tmp: Path, address: str, after_steps: int) -> dict:
    run_dir = tmp / "run"
    proc = train(run_dir, address)
    while len(steps_done(run_dir)) < after_steps:
        if proc.poll() is not None:
            raise RuntimeError(proc.communicate()[1][-2000:])
        time.sleep(0.02)
    signalled = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    stderr, saved_s = "", None
    for line in proc.stderr:
        stderr += line
        if saved_s is None and "checkpoint" in line and "written" in line:
            saved_s = time.perf_counter() - signalled
    proc.wait(timeout=300)
    exit_s = time.perf_counter() - signalled
    match = re.search(r"stopped by SIGTERM after (\d+) steps; checkpoint (\S+) written", stderr)
    if proc.returncode != 143 or not match:
        raise RuntimeError(f"exit {proc.returncode}: {stderr[-2000:]}")
    records = steps_done(run_dir)
    step_s = sorted(r["wall_s"] for r in records[1:])[len(records[1:]) // 2]
    resumed = train(run_dir, address, "--resume", str(run_dir), "--set", f"steps={int(match[1]) + 2}")
    _, resume_err = resumed.communicate(timeout=300)
    first = re.search(r"resuming .* at step (\d+)", resume_err)
    if resumed.returncode != 0 or not first:
        raise RuntimeError(resume_err[-2000:])
    return {"stopped_after": int(match[1]), "saved_s": saved_s, "exit_s": exit_s, "median_step_s": step_s,
            "redone": int(match[1]) - int(first[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--after-steps", type=int, default=7)
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    address = ray.get_runtime_context().gcs_address
    print("| round | stopped after steps | SIGTERM to checkpoint written (s) | SIGTERM to exit (s) | median step (s) "
          "| exit / step | steps redone |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for index in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory() as tmp:
            r = one_round(Path(tmp), address, args.after_steps)
        print(f"| {index} | {r['stopped_after']} | {r['saved_s']:.2f} | {r['exit_s']:.2f} | {r['median_step_s']:.2f} | "
              f"{r['exit_s'] / r['median_step_s']:.1f} | {r['redone']} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
