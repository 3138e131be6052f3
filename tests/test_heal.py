"""Recovery without rollback, with real Ray actors and real gloo groups: the survivors keep
their state, a lost rank is replaced (a hot spare, else a fresh actor) and filled from a
survivor, and no finished step is redone.

Each healed run must end bit-identical to the uninterrupted run of the same config
(`batchnorm: sync`, so BatchNorm running statistics are the same on every rank).

The tests run in file order, the two-worker runs first: each takes the replicas the one before
kept (keep_warm), where a run of another shape would start them afresh (~10 CPU-s each here).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from distrib import Orchestrator, ReplicaError, RunConfig, comm
from distrib.protocol import shards_of
from tests.conftest import assert_bit_identical, flat_state

pytestmark = pytest.mark.usefixtures("ray_local")


def heal_cfg(run_dir, **changes) -> RunConfig:
    return RunConfig(num_workers=2, device="cpu", batch_size_per_worker=4, image_size=32, num_classes=10,
                     steps=6, lr=0.05, check_every=2, checkpoint_every=2, loader_workers=0, batchnorm="sync",
                     run_dir=str(run_dir)).replace(**changes)


def run(cfg: RunConfig) -> tuple[dict, Orchestrator]:
    with Orchestrator(cfg, progress=False) as orch:
        orch.train()
        return flat_state(orch.state()), orch


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return run(heal_cfg(tmp_path_factory.mktemp("ref") / "run"))[0]


def train_cfg(run_dir, **changes) -> RunConfig:
    """batchnorm: train, 8 steps, a check after every step (the ranks' running statistics are
    then averaged every step)."""
    return heal_cfg(run_dir, batchnorm="train", steps=8, check_every=1, **changes)


@pytest.fixture(scope="module")
def uninterrupted_train(tmp_path_factory) -> dict:
    """train_cfg's uninterrupted run. Its parameters and momentum are those of any check_every:
    under `train` a step normalises with its shard's own statistics, never the running ones."""
    return run(train_cfg(tmp_path_factory.mktemp("ref") / "run"))[0]


def without_running_statistics(state: dict) -> dict:
    return {name: tensor for name, tensor in state.items() if "running_" not in name}


def events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def metric_steps(run_dir, kind: str = "step") -> list[int]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [record["step"] for record in records if record["kind"] == kind]


def assert_healed_once(run_dir, *, ranks: list[int], replaced: str) -> dict:
    """One heal of `ranks`, each replaced as `replaced` says, no step redone; returns the event."""
    (event,) = events(run_dir)
    assert event["event"] == "heal" and event["ranks"] == ranks, event
    assert event["replaced"] == {str(r): replaced for r in ranks}
    assert event["steps_redone"] == 0 and event["first_step_s"] > 0
    assert metric_steps(run_dir) == [0, 1, 2, 3, 4, 5]  # each step once
    summary = json.loads((run_dir / "summary.json").read_text())
    (recovery,) = summary["recoveries"]
    assert set(recovery) >= {"detect_s", "drop_s", "replace_s", "state_s", "group_s", "check_s", "first_step_s"}
    assert 0 < summary["goodput"] < 1
    return event


def test_killed_rank_0_without_a_spare_is_replaced_by_a_fresh_actor_between_checkpoints(tmp_path, uninterrupted):
    """No spare: a fresh actor takes rank 0's place, its state from rank 1. With no snapshot to
    go back to (checkpoint_every: 0) a restart would redo every step; a heal redoes none, with
    steps_per_call 2 and the kill in a call's second step. (None of these settings changes a
    number: the uninterrupted run is the reference.) The evaluation after step 2 ran before the
    kill at step 3, so the heal, which goes on from the boundary where it was due, does not
    evaluate again."""
    run_dir = tmp_path / "run"
    healed, orch = run(heal_cfg(run_dir, checkpoint_every=0, steps_per_call=2, faults="kill:0@3",
                                eval_every=3, eval_size=8))
    assert_bit_identical(healed, uninterrupted)
    assert_healed_once(run_dir, ranks=[0], replaced="fresh")
    assert [m.step for m in orch.evals] == metric_steps(run_dir, "eval") == [2, 5]


def test_stalled_replica_is_named_within_seconds_with_the_defaults(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    healed, _ = run(heal_cfg(run_dir, faults="stall:0@4"))  # stall_timeout_s: 3, hang limit 30 s
    assert_bit_identical(healed, uninterrupted)
    event = assert_healed_once(run_dir, ranks=[0], replaced="fresh")
    assert "rank 0 (node" in event["cause"] and "at step 4 in data" in event["cause"]
    assert "(stalled)" in event["cause"]
    assert event["detect_s"] < 5.0


def test_batchnorm_train_heal_keeps_parameters_and_momentum_exact(tmp_path, uninterrupted_train):
    """Under batchnorm: train each rank's running statistics follow its own shards between
    checks (none here); a new rank takes its source's. Parameters and momentum stay bit-identical."""
    healed, _ = run(train_cfg(tmp_path / "run", faults="kill:1@3").replace(check_every=0))
    exact = [name for name in without_running_statistics(healed) if "num_batches" not in name]
    assert_bit_identical({n: healed[n] for n in exact}, {n: uninterrupted_train[n] for n in exact})


def test_shrinks_when_no_replacement_is_ready_and_grows_back(tmp_path, uninterrupted_train):
    """min_workers: 1, elastic_wait_s: 0: a fresh actor takes seconds to start, so the kill of
    rank 1 leaves rank 0 alone, training both logical shards of every global batch, until the
    actor has started and joins at a step boundary.

    Parameters and momentum stay bit-identical to the uninterrupted run: alone, rank 0 adds the
    two shards' gradients, each halved (exact), where DDP halves their sum: the same bits. The
    BatchNorm running statistics agree to fp32 rounding: while shrunk they are averaged over
    the shards every step, in the uninterrupted run over the ranks at each check (every step
    here: with checks further apart a heal loses the lost rank's statistics since the last)."""
    run_dir = tmp_path / "run"
    with Orchestrator(train_cfg(run_dir, faults="kill:1@3", min_workers=1, elastic_wait_s=0), progress=False) as orch:
        orch.train(num_steps=5)
        assert len(orch.nodes) == 1  # shrunk
        deadline = time.monotonic() + 60
        while not orch._group.ready_to_grow() and time.monotonic() < deadline:  # the fresh actor's start
            time.sleep(0.1)
        orch.train()
        assert len(orch.nodes) == 2  # grown back at step 5
        healed = flat_state(orch.state())
    shrink, grow = [e for e in events(run_dir) if e["event"] in ("shrink", "grow")]
    assert (shrink["from"], shrink["to"], grow["from"], grow["to"], grow["step"]) == (2, 1, 1, 2, 5)
    assert metric_steps(run_dir) == list(range(8))  # no step redone
    exact = without_running_statistics(uninterrupted_train)
    assert_bit_identical({n: healed[n] for n in exact}, exact)
    for name in set(uninterrupted_train) - set(exact):
        torch.testing.assert_close(healed[name], uninterrupted_train[name], rtol=1e-5, atol=1e-6)


def test_deterministic_error_stops_instead_of_using_up_restarts(tmp_path):
    cfg = heal_cfg(tmp_path / "run", faults="error:1@3", max_restarts=3)
    with pytest.raises(ReplicaError, match=r"rank 1 .* failed during step 3.*RuntimeError: injected error at "
                                           r"step 3 \(the same failure at step 3 as before: deterministic"):
        run(cfg)
    (event,) = events(tmp_path / "run")  # one heal, then the same error again: stop
    assert event["event"] == "heal" and event["replaced"] == {}


def test_killed_replica_is_replaced_by_a_hot_spare(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    healed, orch = run(heal_cfg(run_dir, faults="kill:1@3", spare_workers=1))
    assert_bit_identical(healed, uninterrupted)
    event = assert_healed_once(run_dir, ranks=[1], replaced="spare")
    # step 2 or 3: the kill may beat the sending of step 2's result (step 2 is then not redone either)
    assert "rank 1" in event["cause"] and re.search(r"died during step [23]", event["cause"])
    assert orch.restarts == 1


def test_two_replicas_lost_at_once(tmp_path):
    cfg = heal_cfg(tmp_path / "ref", num_workers=3)  # the state comes from the one survivor
    reference, _ = run(cfg)
    run_dir = tmp_path / "run"
    healed, _ = run(cfg.replace(run_dir=str(run_dir), faults="kill:1@3, kill:2@3"))
    assert_bit_identical(healed, reference)
    assert_healed_once(run_dir, ranks=[1, 2], replaced="fresh")


def shrunk_loss_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from distrib.trainer import Trainer

    trainer = Trainer(heal_cfg(out_dir, batchnorm="train", num_workers=3), weights=None)
    comm.init_process_group(backend="gloo", master_addr="127.0.0.1", master_port=port, world_rank=rank,
                            world_size=world_size, timeout_s=60)
    trainer.join(world_rank=rank, shards=shards_of(3, world_size)[rank], faults=None)
    (record,) = trainer.run_steps(0, 1)
    (Path(out_dir) / f"{world_size}-{rank}.json").write_text(json.dumps(record["loss"]))
    comm.leave_process_group()


def test_a_shrunk_group_reports_the_global_batch_loss(tmp_path):
    """3 workers' shards on 2 ranks, one of which trains two: the step's loss as the driver
    combines the ranks' records (their mean, for cross-entropy: metrics.aggregate) is the
    global batch's mean, as one rank training all three shards reports it, whichever number
    of shards a rank holds."""
    combined = {}
    for world_size in (2, 1):
        mp.spawn(shrunk_loss_worker, args=(world_size, comm.free_port(), str(tmp_path)), nprocs=world_size)
        losses = [json.loads((tmp_path / f"{world_size}-{rank}.json").read_text()) for rank in range(world_size)]
        combined[world_size] = sum(losses) / world_size
    assert combined[2] == pytest.approx(combined[1], rel=1e-6)


def test_cli_failure_prints_one_clear_line_and_no_ray_tracebacks(tmp_path, ray_address):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "distrib", "train", "--no-progress", "--address", ray_address,
         "--set", "device=cpu", "--set", "image_size=32",
         "--set", "batch_size_per_worker=4", "--set", "num_classes=10", "--set", "steps=6", "--set", "loader_workers=0",
         "--set", "faults=error:1@3", "--set", f"run_dir={run_dir}"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Unhandled error" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "injected error at step 3" in last and "deterministic, not retried" in last
