"""A checkpoint that fails on the replica after the steps queued behind it ran is healed from.

The failure is real: Ray refuses to create an object that must spill to disk once the disk is
fuller than local_fs_capacity_threshold (OutOfDiskError), which a CI machine's 95%-full disk
once did to the tests' snapshots. Here the object store is Ray's smallest (75 MiB) and the
threshold 0, so every resnet18 snapshot (~90 MB with its momentum) fails that way, while the
replicas run the steps the driver queued behind it (twice calls_in_flight calls).
"""

from __future__ import annotations

import json

import pytest
import ray

from distrib import Orchestrator, RunConfig
from tests.conftest import RAY_DISK_THRESHOLD_VAR


@pytest.fixture(scope="module")
def ray_small_store():
    """A local Ray instance whose object store cannot hold a snapshot: the raylet reads the
    threshold from its environment when it starts."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(RAY_DISK_THRESHOLD_VAR, "0")
        ray.init(num_cpus=4, object_store_memory=75 * 1024 * 1024, include_dashboard=False,
                 logging_level="WARNING")
    yield
    ray.shutdown()


def run_cfg(run_dir, **changes) -> RunConfig:
    # 7 steps, a checkpoint at 3: steps 3-6 are queued behind it, and the run ends at 7 with a
    # check, not a checkpoint (which would fail again).
    return RunConfig(num_workers=2, device="cpu", batch_size_per_worker=4, image_size=32, num_classes=10,
                     steps=7, lr=0.05, check_every=3, checkpoint_every=3, loader_workers=0,
                     recovery="heal", max_restarts=1, run_dir=str(run_dir)).replace(**changes)


def rank0_fingerprint(orch: Orchestrator) -> list:
    # The state itself (~90 MB) cannot pass through this object store; its digests can. A
    # fingerprint is collective (it gathers the BatchNorm buffers' statistics): every rank takes it.
    return ray.get([replica.fingerprint.remote() for replica in orch.replicas])[0]


def test_failed_checkpoint_is_healed_with_every_step_reported_once(ray_small_store, tmp_path):
    with Orchestrator(run_cfg(tmp_path / "ref", checkpoint_every=0), progress=False) as orch:
        orch.train()
        uninterrupted = rank0_fingerprint(orch)
    run_dir = tmp_path / "run"
    with Orchestrator(run_cfg(run_dir), progress=False) as orch:
        orch.train()  # before the fix: KeyError, a step finished by all but kept by none
        assert orch.restarts == 1
        assert rank0_fingerprint(orch) == uninterrupted
    (event,) = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert event["event"] == "heal" and event["steps_redone"] == 0, event
    assert "OutOfDiskError: Ray's object store is full" in event["cause"] and event["step"] == 3, event
    assert "free space on that disk" in event["cause"], event
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss" in m and "top1" not in m] == list(range(7))
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
