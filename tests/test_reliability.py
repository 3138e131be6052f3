"""Fault injection with real Ray and real gloo: resume, restarts from a snapshot, the hang
limit as the backstop (healing is tested in test_heal.py).

Every recovered or resumed run must end bit-identical to the uninterrupted run of
the same config (parameters, momentum and BatchNorm buffers).
"""

from __future__ import annotations

import json
import re

import pytest

from distrib import Orchestrator, RunConfig, warm
from tests.conftest import assert_bit_identical, flat_state

pytestmark = pytest.mark.usefixtures("ray_local")


def base_cfg(run_dir) -> RunConfig:
    """A learning-rate schedule too (a warm-up step, then halved at steps 2 and 4): a resumed or
    restarted run must take it up at the step it restores, as the driver owns the schedule."""
    return RunConfig(num_workers=2, device="cpu", batch_size_per_worker=4, image_size=32, num_classes=10,
                     steps=6, lr=0.05, lr_schedule="step", lr_milestones=(2, 4), lr_gamma=0.5, warmup_steps=1,
                     lr_scaling="linear", base_batch_size=4, check_every=2, checkpoint_every=2, loader_workers=0,
                     run_dir=str(run_dir))


def final_state(orch: Orchestrator) -> dict:
    return flat_state(orch.state())


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory) -> dict:
    with Orchestrator(base_cfg(tmp_path_factory.mktemp("ref") / "run"), progress=False) as orch:
        orch.train()
        return final_state(orch)


def metric_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    with Orchestrator(base_cfg(run_dir), progress=False) as orch:
        orch.train(3)  # stops after step 2; the newest checkpoint holds 2 steps
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002.ckpt"]
    with Orchestrator(base_cfg(run_dir), progress=False, resume_dir=run_dir) as orch:
        assert orch.step_count == 2
        orch.train()
        resumed = final_state(orch)
    assert_bit_identical(resumed, uninterrupted)
    assert metric_steps(run_dir) == [0, 1, 2, 3, 4, 5]
    # peak 0.05 x 8 / 4, a warm-up step, then halved at steps 2 and 4
    lrs = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    # the last K are kept (K = 2): the step-6 one and the step-4 one
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000004.ckpt",
                                                                          "step-00000006.ckpt"]


def test_restart_from_a_snapshot_leaves_the_run_unchanged(tmp_path, uninterrupted, monkeypatch):
    """Rank 1 killed at step 3, recovery: restart: back to the snapshot of step 2. That first
    restart itself fails as its group starts (injected once the group is up, as a replica lost
    then): a failure like any other, counted and recorded, and another restart follows."""
    from distrib import ReplicaError

    real_start, starts = Orchestrator._start_group, []

    def start_group(self):
        real_start(self)
        starts.append(self.step_count)
        if len(starts) == 2:  # the first restart's
            raise ReplicaError("injected: rank 1 lost as the group started", ranks=[1])

    monkeypatch.setattr(Orchestrator, "_start_group", start_group)
    run_dir = tmp_path / "run"
    with Orchestrator(base_cfg(run_dir).replace(faults="kill:1@3", recovery="restart"), progress=False) as orch:
        orch.train()
        recovered = final_state(orch)
    assert starts == [0, 2, 2] and orch.restarts == 2
    assert_bit_identical(recovered, uninterrupted)
    failed, restart = events(run_dir)
    assert failed["event"] == "failed" and failed["ranks"] == [1] and "injected: rank 1 lost" in failed["error"]
    # The failed restart had gone back to step 2: the steps it rewound count as redone.
    assert failed["restored_step"] == 2 and failed["steps_redone"] == failed["step"] - 2 > 0
    assert re.search(r"rank 1 .*died during steps? [23]", failed["cause"])
    assert restart["event"] == "restart" and restart["ranks"] == [1] and restart["restored_step"] == 2
    assert restart["steps_redone"] == 0  # the failed restart had gone back to step 2 already
    assert metric_steps(run_dir) == [0, 1, 2, 3, 4, 5]


def test_hang_limit_is_the_backstop_without_the_stall_watch(tmp_path, uninterrupted):
    """stall_timeout_s: 0 turns the stall watch off: the derived hang limit names the stuck rank.
    The stall comes right after a check, so under batchnorm: train the healed rank's running
    statistics (its source's) are the averaged ones it would have had: bit-identical."""
    run_dir = tmp_path / "run"
    cfg = base_cfg(run_dir).replace(faults="stall:0@4", hang_timeout_min_s=3.0, hang_timeout_factor=5.0,
                                    stall_timeout_s=0)
    with Orchestrator(cfg, progress=False) as orch:
        orch.train()
        recovered = final_state(orch)
    assert orch.restarts == 1
    assert_bit_identical(recovered, uninterrupted)
    (heal,) = events(run_dir)
    assert re.match(r"step 4 .*did not finish within 3.0 s", heal["cause"])
    assert "rank 0 (node" in heal["cause"] and "stuck at step 4 in data" in heal["cause"]
    assert heal["event"] == "heal" and heal["replaced"] == {"0": "fresh"} and heal["steps_redone"] == 0


def test_out_of_restarts_is_a_clear_error(tmp_path):
    from distrib import ReplicaError

    cfg = base_cfg(tmp_path / "run").replace(faults="kill:0@1", max_restarts=0)
    with (pytest.raises(ReplicaError, match=r"rank 0 .* died during step .*no restarts left: max_restarts=0"),
          Orchestrator(cfg, progress=False) as orch):
        orch.train()


def test_cli_resume_refuses_a_corrupt_run_clearly(tmp_path):
    """Before any Ray: RAY_ADDRESS names a port nothing listens on, so a driver that tried to
    connect first would fail on that instead (after Ray's own retries)."""
    import os
    import subprocess
    import sys

    from distrib import checkpoint, config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = base_cfg(run_dir)
    (run_dir / "config.yaml").write_text(__import__("yaml").safe_dump(config.to_dict(cfg)))
    path = checkpoint.write(run_dir, step=2, cfg=cfg, payload=b"x" * 100, keep=2)
    path.write_bytes(path.read_bytes()[:-10])  # truncated, as by a crash mid-copy
    done = subprocess.run([sys.executable, "-m", "distrib", "train", "--resume", str(run_dir)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:9"})
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("distrib: error: no valid checkpoint in") and "is truncated" in last


def test_a_start_that_fails_leaves_no_run_directory(tmp_path):
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from distrib import PlacementError

    # The cluster could hold the group (the fixed-cluster check passes), but another job
    # holds 3 of its 4 CPUs: placement fails after the run directory was made. (Replicas kept
    # from this module's earlier runs are released first: they hold 2 of the 4.)
    warm.release()
    other_job = placement_group([{"CPU": 3}])
    ray.get(other_job.ready())
    try:
        run_dir = tmp_path / "run"
        with pytest.raises(PlacementError, match="could not place 2 x"):
            Orchestrator(base_cfg(run_dir).replace(start_timeout_s=1), progress=False).start()
        assert not run_dir.exists()
        kept = tmp_path / "kept"  # a directory that was there before stays, emptied of the run's files
        kept.mkdir()
        (kept / "notes.txt").write_text("mine")
        with pytest.raises(PlacementError):
            Orchestrator(base_cfg(kept).replace(start_timeout_s=1), progress=False).start()
        # Each failed start withdrew its request: none would take the CPUs the other job frees.
        assert [pg["state"] for pg in placement_group_table().values() if pg["state"] != "REMOVED"] == ["CREATED"]
    finally:
        remove_placement_group(other_job)
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
