"""Faults injected into real runs, and what they cost: detection time, recovery time, divergence.

Runs on this machine with local Ray and gloo (2 CPU workers, resnet18 at 64 px,
batch 16 per worker, a snapshot every 4 steps):
- a replica's process killed at step 6 (`faults: kill:1@6`);
- a replica stalled at step 10 (`faults: stall:0@10`, hang floor 5 s);
- a node removed at step 6 from a 2-node cluster on this machine, a new node added 1 s later.
Each run is compared, bit for bit, with an uninterrupted run of the same config.

    .venv/bin/python bench/faults.py
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster

from distrib import Orchestrator, RunConfig


def cfg(run_dir: Path, **changes) -> RunConfig:
    return RunConfig(num_workers=2, device="cpu", batch_size_per_worker=16, image_size=64, steps=16,
                     check_every=4, checkpoint_every=4, hang_timeout_min_s=5.0, run_dir=str(run_dir)).replace(**changes)


def final_state(orch: Orchestrator) -> dict:
    state = orch.state()
    tensors = dict(state["model"])
    tensors.update({f"momentum.{k}": v["momentum_buffer"] for k, v in state["optimizer"]["state"].items()})
    return tensors


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def timings(run_dir: Path, fault_at: float) -> tuple[float, float]:
    """(fault -> detection, fault -> first step finished after the restart), in seconds."""
    event = json.loads((run_dir / "events.jsonl").read_text().splitlines()[0])
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_after = next(s["finished_at"] for s in steps if s["step"] == event["restored_step"])
    return event["detected_at"] - fault_at, first_after - fault_at


def injected(tmp: Path, reference: dict, name: str, faults: str) -> dict:
    run_dir = tmp / name
    with Orchestrator(cfg(run_dir, faults=faults), progress=False) as orch:
        orch.train()
        state, restarts = final_state(orch), orch.restarts
    # An injected fault fires as its step starts, right after the replica finished the step
    # before: the driver's last recorded progress is the moment of the fault (to a few ms).
    event = json.loads((run_dir / "events.jsonl").read_text().splitlines()[0])
    detect, recover = timings(run_dir, event["last_progress_at"])
    return {"fault": name, "restarts": restarts, "detect_s": detect, "recover_s": recover,
            "max_abs_diff": max_diff(state, reference)}


def node_loss(tmp: Path) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        spread = dict(placement_strategy="SPREAD", cpus_per_worker=1)
        with Orchestrator(cfg(tmp / "node-ref", **spread), progress=False) as orch:
            orch.train()
            reference = final_state(orch)
        run_dir = tmp / "node"
        with Orchestrator(cfg(run_dir, **spread), progress=False) as orch:
            errors = []
            training = threading.Thread(target=lambda: _train(orch, errors), daemon=True)
            training.start()
            while orch.step_count < 6:
                time.sleep(0.02)
            (node,) = [n for n in cluster.worker_nodes if n.node_id == orch.nodes[1].node_id]
            fault_at = time.time()
            cluster.remove_node(node, allow_graceful=False)
            time.sleep(1)
            cluster.add_node(num_cpus=1)
            training.join()
            if errors:
                raise errors[0]
            state, restarts = final_state(orch), orch.restarts
        detect, recover = timings(run_dir, fault_at)
        return {"fault": "node removed", "restarts": restarts, "detect_s": detect, "recover_s": recover,
                "max_abs_diff": max_diff(state, reference)}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _train(orch: Orchestrator, errors: list) -> None:
    try:
        orch.train()
    except BaseException as err:
        errors.append(err)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
        with Orchestrator(cfg(tmp / "ref"), progress=False) as orch:
            orch.train()
            reference = final_state(orch)
        rows = [injected(tmp, reference, "process killed", "kill:1@6"),
                injected(tmp, reference, "replica stalled", "stall:0@10")]
        ray.shutdown()
        rows.append(node_loss(tmp))
    print("| fault | restarts | fault -> detected (s) | fault -> first step after recovery (s) "
          "| max abs diff vs uninterrupted |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['fault']} | {r['restarts']} | {r['detect_s']:.2f} | {r['recover_s']:.2f} | {r['max_abs_diff']} |")


if __name__ == "__main__":
    main()
