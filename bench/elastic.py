"""Elastic runs: a group that shrinks when a lost rank cannot be replaced, and grows back.

Real runs on this machine with local Ray and gloo (resnet18 at 64 px, batch 16 per worker,
`batchnorm: train`, every other setting default), each against the uninterrupted run of the
same config:
- 2 workers, `min_workers: 1`, `elastic_wait_s: 0`: rank 1's process killed as step 6
  starts; rank 0 trains both logical shards until the fresh actor has started and joins;
- the same with 4 workers (`min_workers: 3`): rank 0 then trains shards 0 and 3, and the
  gradient of a shard is scaled by 3/4, which rounds; again with `batchnorm: frozen`, where
  a rounding difference is not amplified by BatchNorm's batch statistics;
- a node removed at step 6 from a 2-node cluster with no room for its bundle
  (`elastic_wait_s: 2`); a node added 5 s later, where the group grows back.

Printed per run: fault -> next finished step, the steps run shrunk, images/s shrunk against
full size, and the largest difference from the uninterrupted run in parameters and momentum
and in BatchNorm running statistics (which a heal under `train` does not keep exactly:
between checks each rank's follow its own shards, and the lost rank's are gone).

    .venv/bin/python bench/elastic.py
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import ray
from faults import final_state, train_collecting_errors  # bench/: the script's own folder
from ray.cluster_utils import Cluster

from distrib import Orchestrator, RunConfig


def cfg(run_dir: Path, **changes) -> RunConfig:
    return RunConfig(num_workers=2, device="cpu", batch_size_per_worker=16, image_size=64, steps=24,
                     run_dir=str(run_dir)).replace(**changes)


def max_diff(a: dict, b: dict, *, running: bool) -> float:
    names = [k for k in a if ("running_" in k) == running]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in names)


def result(name: str, run_dir: Path, state: dict, reference: dict, *, fault_at: float | None = None) -> dict:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    heal = next(e for e in events if e["event"] == "heal")
    sizes = [e for e in events if e["event"] in ("shrink", "grow")]
    shrunk = [e["step"] for e in sizes]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    wall = {m["step"]: m["wall_s"] for m in metrics if "wall_s" in m}
    full_s = statistics.median(wall[s] for s in wall if s < heal["step"] - 1 or (len(shrunk) > 1 and s > shrunk[1]))
    shrunk_s = statistics.median(wall[s] for s in wall if shrunk[0] < s < (shrunk[1] if len(shrunk) > 1 else 1e9))
    fault_at = heal["last_progress_at"] if fault_at is None else fault_at
    return {"run": name, "sizes": " -> ".join([str(sizes[0]["from"])] + [str(e["to"]) for e in sizes]),
            "next_step_s": heal["detected_at"] + heal["first_step_s"] - fault_at,
            "steps_shrunk": (shrunk[1] if len(shrunk) > 1 else metrics[-1]["step"] + 1) - shrunk[0],
            "speed": full_s / shrunk_s, "params": max_diff(state, reference, running=False),
            "running": max_diff(state, reference, running=True)}


def killed(tmp: Path, name: str, **changes) -> dict:
    with Orchestrator(cfg(tmp / f"{name}-ref", **changes), progress=False) as orch:
        orch.train()
        reference = final_state(orch)
    run_dir = tmp / name
    elastic = dict(changes, faults="kill:1@6", min_workers=changes.get("num_workers", 2) - 1, elastic_wait_s=0)
    with Orchestrator(cfg(run_dir, **elastic), progress=False) as orch:
        orch.train()
        state = final_state(orch)
    return result(name, run_dir, state, reference)


def node_lost(tmp: Path) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        spread = dict(placement_strategy="SPREAD", loader_workers=0, steps=48)  # long enough to grow back
        with Orchestrator(cfg(tmp / "node-ref", **spread), progress=False) as orch:
            orch.train()
            reference = final_state(orch)
        run_dir = tmp / "node"
        with Orchestrator(cfg(run_dir, min_workers=1, elastic_wait_s=2, **spread), progress=False) as orch:
            errors: list = []
            training = threading.Thread(target=lambda: train_collecting_errors(orch, errors), daemon=True)
            training.start()
            while orch.step_count < 6:
                time.sleep(0.02)
            (node,) = [n for n in cluster.worker_nodes if n.node_id == orch.nodes[1].node_id]
            fault_at = time.time()
            cluster.remove_node(node, allow_graceful=False)
            time.sleep(5)
            cluster.add_node(num_cpus=1)
            training.join()
            if errors:
                raise errors[0]
            state = final_state(orch)
        return result("node lost, no room, node back 5 s later", run_dir, state, reference, fault_at=fault_at)
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
        four = dict(num_workers=4, cpus_per_worker=0.5, loader_workers=0)
        rows = [killed(tmp, "2 workers, rank 1 killed"),
                killed(tmp, "4 workers, rank 1 killed", **four),
                killed(tmp, "4 workers, rank 1 killed, batchnorm: frozen", batchnorm="frozen", **four)]
        ray.shutdown()
        rows.append(node_lost(tmp))
    print("| run | ranks | fault -> next step (s) | steps shrunk | step time full / shrunk "
          "| max abs diff: parameters, momentum | BatchNorm running stats |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r['sizes']} | {r['next_step_s']:.2f} | {r['steps_shrunk']} | {r['speed']:.2f} "
              f"| {r['params']:.3g} | {r['running']:.3g} |")


if __name__ == "__main__":
    main()
