"""Checkpoint files: atomic writes, a crash mid-write, corruption, truncation, foreign configs."""

from __future__ import annotations

import io
import os
import sys
import threading
import time

import pytest

from distrib import checkpoint
from distrib.checkpoint import CheckpointError
from distrib.config import RunConfig

CFG = RunConfig(steps=10)


def write(run_dir, step: int, payload: bytes = b"state", keep: int = 3):
    return checkpoint.write(run_dir, step=step, cfg=CFG, payload=payload + bytes([step]), keep=keep)


def test_round_trip_and_keep_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        write(tmp_path, step, keep=2)
    names = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir())
    assert names == ["step-00000006.ckpt", "step-00000008.ckpt"]
    ckpt, skipped = checkpoint.newest_valid(tmp_path)
    assert (ckpt.step, ckpt.payload, skipped) == (8, b"state\x08", [])
    assert ckpt.config["steps"] == 10


def test_crash_during_a_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    write(tmp_path, 2)

    def crash(*args):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, 4)
    monkeypatch.undo()
    ckpt, skipped = checkpoint.newest_valid(tmp_path)
    assert ckpt.step == 2 and skipped == []
    assert not list(checkpoint.checkpoint_dir(tmp_path).glob("*.tmp"))  # a failed write leaves no 90 MB behind


def test_a_new_checkpoint_replaces_those_of_the_timeline_it_left(tmp_path):
    """Resumed from step 2 because step 4 is damaged, the run writes step 3: keep=1 keeps step 3,
    not the damaged step 4 (which sorts after it), and step 4 goes as well."""
    write(tmp_path, 2)
    damaged = write(tmp_path, 4)
    damaged.write_bytes(damaged.read_bytes()[:-3])
    write(tmp_path, 3, keep=1)
    assert [p.name for p in checkpoint.on_disk(tmp_path)] == ["step-00000003.ckpt"]
    assert checkpoint.newest_valid(tmp_path)[0].step == 3


def test_a_marker_copied_down_from_object_storage_is_not_obeyed_locally(tmp_path):
    """Local checkpoints appear by rename and need no marker; one synced down with a run from
    object storage names a checkpoint the run has since moved past, and goes at the next write."""
    write(tmp_path, 2)
    marker = checkpoint.checkpoint_dir(tmp_path) / checkpoint.MARKER
    marker.write_text('{"step": 2, "file": "step-00000002.ckpt"}\n')
    write(tmp_path, 4)
    assert checkpoint.newest_valid(tmp_path)[0].step == 4
    assert not marker.exists()


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda data: data[:-3], "is truncated"),
    (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "is corrupt"),
    (lambda data: b"garbage" + data, "is not a distrib checkpoint"),
    (lambda data: data[:30], "unreadable"),
])
def test_damaged_newest_falls_back_to_the_one_before(tmp_path, damage, reason):
    write(tmp_path, 2)
    newest = write(tmp_path, 4)
    newest.write_bytes(damage(newest.read_bytes()))
    ckpt, skipped = checkpoint.newest_valid(tmp_path)
    assert ckpt.step == 2
    assert len(skipped) == 1 and reason in skipped[0] and "step-00000004.ckpt" in skipped[0]
    with pytest.raises(CheckpointError, match=reason):
        checkpoint.read(newest)


@pytest.mark.parametrize("stored", [b"MAGIC-header-payload", b"MAGIC-header-paylaod", b"MAGIC-header-pay", b""])
def test_an_upload_is_checked_byte_for_byte_against_what_was_sent(tmp_path, stored):
    path = tmp_path / "step-00000002.ckpt"
    path.write_bytes(stored)
    chunks = [b"MAGIC-", b"header-", b"payload"]
    if stored == b"".join(chunks):
        checkpoint.check_uploaded(path, chunks)
        return
    with pytest.raises(CheckpointError, match="did not upload whole"):
        checkpoint.check_uploaded(path, chunks)


def test_no_valid_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no valid checkpoint in"):
        checkpoint.newest_valid(tmp_path)


def test_a_checkpoint_from_another_config_is_refused(tmp_path):
    write(tmp_path, 2)
    ckpt, _ = checkpoint.newest_valid(tmp_path)
    checkpoint.check_compatible(ckpt, CFG.replace(steps=20, faults="", eval_every=4))  # driving keys may change
    # Under batchnorm: train with 2+ workers the checks are where the ranks average their BatchNorm
    # running statistics: moving them rounds those otherwise (by ~1e-8), so they must stay.
    with pytest.raises(CheckpointError, match="check_every is 10 there, 5 here; resume with the same check_every"):
        checkpoint.check_compatible(ckpt, CFG.replace(check_every=5))
    with pytest.raises(CheckpointError, match="checkpoint_every is 100 there, 50 here"):
        checkpoint.check_compatible(ckpt, CFG.replace(checkpoint_every=50))
    with pytest.raises(CheckpointError, match=r"from a different run: lr is 0.01 there, 0.1 here"):
        checkpoint.check_compatible(ckpt, CFG.replace(lr=0.1))
    with pytest.raises(CheckpointError, match="num_classes is 1000 there, 10 here"):
        checkpoint.check_compatible(ckpt, CFG.replace(num_classes=10))
    with pytest.raises(CheckpointError, match="past steps=1: the run is done; raise steps"):
        checkpoint.check_compatible(ckpt, CFG.replace(steps=1))
    # A run stopped after its last step: a resume would train nothing and only rewrite its summary.
    with pytest.raises(CheckpointError, match="at steps=2: the run is done; raise steps"):
        checkpoint.check_compatible(ckpt, CFG.replace(steps=2))


def test_a_resume_that_changes_the_maths_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """The Orchestrator reads the checkpoint when it is made: a key that would change the numbers
    is refused there, before start() connects to Ray. A key left `auto` (resolved only once Ray
    shows the cluster) is checked at start."""
    import ray

    from distrib.driver import Orchestrator

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    resolved = CFG.replace(device="cpu", backend="gloo", precision="fp32", run_dir=str(tmp_path))
    checkpoint.write(tmp_path, step=2, cfg=resolved, payload=b"state", keep=1)
    with pytest.raises(CheckpointError, match="from a different run: lr is 0.01 there, 0.1 here"):
        Orchestrator(resolved.replace(lr=0.1), resume_dir=tmp_path, progress=False)
    Orchestrator(resolved.replace(device="auto", backend="auto", precision="auto"), resume_dir=tmp_path,
                 progress=False)


@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_snapshot_holds_the_state_as_begun_while_the_steps_go_on(device, prepared):
    import io

    import torch

    from distrib.hostcopy import HostSnapshots, to_bytes

    def load(key: int) -> dict:
        return torch.load(io.BytesIO(to_bytes(snapshots.take(key))), weights_only=True)

    snapshots = HostSnapshots(torch.device(device))
    with pytest.raises(RuntimeError, match="no snapshot was begun after step 0"):
        snapshots.take(0)
    weight = torch.arange(1 << 20, dtype=torch.float32, device=device)
    momentum = weight.view(1024, 1024).t()  # strided, as channels_last weights are
    state = {"model": {"weight": weight, "count": torch.tensor(7)},
             "optimizer": {"state": {0: {"momentum_buffer": momentum}}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    ahead = None
    if prepared:  # on a GPU the pinned buffer is allocated on a thread, before the first snapshot
        snapshots.prepare(lambda: state)
        if device == "cuda":
            snapshots._allocating.join()
            ahead = snapshots._flat
            assert ahead.is_pinned()
    for round_ in range(2):  # the second reuses the first's host buffer
        expected = weight.cpu().clone()
        snapshots.begin(state, key=round_)
        assert ahead is None or snapshots._flat is ahead
        weight.mul_(3).add_(1)  # the next step, queued at once
        taken = load(round_)
        assert torch.equal(taken["model"]["weight"], expected), round_
        assert torch.equal(taken["model"]["count"], torch.tensor(7))
        taken_momentum = taken["optimizer"]["state"][0]["momentum_buffer"]
        assert torch.equal(taken_momentum, expected.view(1024, 1024).t())
        assert taken_momentum.stride() == momentum.stride()
        assert taken["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    # Checkpoints closer together than the steps the driver keeps queued: the next one is begun
    # before the last one is taken, and each still holds the state as it was begun.
    at_5 = weight.cpu().clone()
    snapshots.begin(state, key=5)
    weight.add_(1)
    snapshots.begin(state, key=6)
    weight.add_(1)
    assert torch.equal(load(5)["model"]["weight"], at_5)
    assert torch.equal(load(6)["model"]["weight"], at_5 + 1)
    with pytest.raises(RuntimeError, match="no snapshot was begun after step 5"):
        snapshots.take(5)


def test_a_snapshot_taken_while_the_next_is_begun_keeps_its_own_state(monkeypatch):
    """take runs on the actor's snapshot thread, begin on the step thread: a begin must not
    overwrite the host buffer while the snapshot taken before it is still being copied out
    (its copy-out slowed here, so that the two overlap every time)."""
    import torch

    from distrib import hostcopy

    copy_out = hostcopy._copy_out

    def slow_copy_out(*args):
        time.sleep(0.3)
        copy_out(*args)

    monkeypatch.setattr(hostcopy, "_copy_out", slow_copy_out)
    snapshots = hostcopy.HostSnapshots(torch.device("cpu"))
    weight = torch.zeros(1 << 16)
    state = {"model": {"weight": weight}}
    snapshots.begin(state, key=5)
    taken = {}
    taker = threading.Thread(target=lambda: taken.update(state=snapshots.take(5)))
    taker.start()
    time.sleep(0.05)  # the taker is waiting for snapshot 5's copy-out
    weight.add_(1)  # step 6
    snapshots.begin(state, key=6)
    taker.join()
    for state_taken, expected in ((taken["state"], 0.0), (snapshots.take(6), 1.0)):
        loaded = torch.load(io.BytesIO(hostcopy.to_bytes(state_taken)), weights_only=True)
        assert torch.equal(loaded["model"]["weight"], torch.full((1 << 16,), expected))


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
def test_checkpoints_are_written_at_the_lowest_cpu_priority(tmp_path):
    """The writer thread takes only CPU that replicas on the driver's machine leave idle."""
    from distrib.rundir import WRITER_NICE, RunDir

    run = RunDir.create(RunConfig(run_dir=str(tmp_path / "run")))
    try:
        nice = run._writer.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    finally:
        run.close()
    assert nice == WRITER_NICE == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < nice  # the driver's own thread is not


def test_a_checkpoint_that_cannot_be_written_fails_the_run_in_one_line(tmp_path):
    """A full disk or a store's error mid-run is a failed run (WriteError: exit 1), naming the
    file, the cause and how to go on; not a traceback, nor "bad input" (exit 2)."""
    from distrib.errors import WriteError
    from distrib.rundir import RunDir

    run = RunDir.create(RunConfig(run_dir=str(tmp_path / "run")))
    (tmp_path / "run" / "checkpoints").write_text("in the folder's way")
    try:
        run.save(2, b"state")
        with pytest.raises(WriteError) as err:
            run.flush()
    finally:
        run.close()
    message, where = str(err.value), tmp_path / "run" / "checkpoints" / "step-00000002.ckpt"
    assert message.startswith(f"the checkpoint {where} could not be written (")
    assert message.endswith(f"resume with: distrib train --resume {tmp_path / 'run'}") and "\n" not in message
    assert run.newest_written is None


def test_a_failed_start_removes_the_folders_it_made_and_no_other(tmp_path):
    from distrib.rundir import RunDir

    (tmp_path / "there").mkdir()
    run = RunDir.create(RunConfig(run_dir=str(tmp_path / "there" / "new" / "deeper" / "run")))
    (tmp_path / "there" / "mine.txt").write_text("a user's file")
    run.discard()
    assert [p.name for p in tmp_path.iterdir()] == ["there"]
    assert [p.name for p in (tmp_path / "there").iterdir()] == ["mine.txt"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where no folder can be made")
def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path):
    from distrib.errors import ConfigError
    from distrib.rundir import RunDir

    with pytest.raises(ConfigError, match=r"run_dir: '/proc/distrib-run' cannot be made \(.*\); choose another"):
        RunDir.create(RunConfig(run_dir="/proc/distrib-run"))


@pytest.mark.parametrize("held", ["config.yaml", "summary.json", "checkpoints"])
def test_a_new_run_refuses_a_directory_holding_what_a_run_writes(tmp_path, held):
    """A start that fails removes the run's files (discard): a user's own config.yaml kept in
    the directory would be written over, then deleted."""
    from distrib.errors import ConfigError
    from distrib.rundir import RunDir

    run_dir = tmp_path / "exp"
    (run_dir / held).parent.mkdir(parents=True)
    if held == "checkpoints":
        (run_dir / held).mkdir()
    else:
        (run_dir / held).write_text("mine: 1  # a comment\n")
    before = sorted((p.name, p.is_dir() or p.read_text()) for p in run_dir.iterdir())
    with pytest.raises(ConfigError, match=rf"run_dir: '.*exp' already holds {held}, which a run writes; choose"):
        RunDir.create(RunConfig(run_dir=str(run_dir)))
    assert sorted((p.name, p.is_dir() or p.read_text()) for p in run_dir.iterdir()) == before


def test_a_line_cut_short_by_a_crash_is_dropped_not_joined(tmp_path):
    """A driver killed mid-write leaves a last line with no newline. A resume rewinds the metrics
    (which parses every line) and appends events: neither may fail on it or join it."""
    import json

    from distrib.storage import LineLog

    metrics, events = tmp_path / "metrics.jsonl", tmp_path / "events.jsonl"
    metrics.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"st')
    events.write_text('{"event": "heal"}\n{"eve')
    log = LineLog(metrics, upload_every_s=0.0, create=True)  # as RunDir opens it on a resume
    log.keep(lambda line: json.loads(line)["step"] < 2)  # the rewind to a checkpoint at step 2
    log.append('{"step": 2}')
    log.close()
    assert metrics.read_text() == '{"step": 0}\n{"step": 1}\n{"step": 2}\n'
    log = LineLog(events, upload_every_s=0.0, create=False)
    log.append('{"event": "restart"}')
    log.close()
    assert events.read_text() == '{"event": "heal"}\n{"event": "restart"}\n'
