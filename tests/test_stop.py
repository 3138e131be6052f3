"""Graceful stop with real Ray and gloo: SIGTERM and SIGINT save the run at the next step
boundary, and a second signal or stop_grace_s stops at once. (A node drained for a
preemption is in test_nodes.py; `ray job stop` in test_deploy.py.)

The CLI runs as a subprocess joined to this module's Ray instance (so no local Ray
start per run), and is signalled as `kill`, `ray job stop` or Kubernetes would.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

from distrib import Orchestrator, RunConfig, checkpoint, config, keep_warm
from tests.conftest import assert_bit_identical, flat_state

pytestmark = pytest.mark.usefixtures("ray_local")


def stop_cfg(run_dir: Path, **changes) -> RunConfig:
    """Steps long enough (20) that a signal sent after 6 of them lands mid-run: 14 steps are
    still to run when the test, polling every 0.05 s, sends it (a step takes 0.3-0.5 s here).

    batchnorm: train (the default), where each rank's BatchNorm running statistics are its own
    between the run's checks: a stop's checkpoint must carry every rank's (bnstats.py)."""
    return RunConfig(num_workers=2, device="cpu", batch_size_per_worker=4, image_size=32, num_classes=10,
                     steps=20, lr=0.05, check_every=4, checkpoint_every=4, loader_workers=0,
                     run_dir=str(run_dir)).replace(**changes)


# The signal tests check and checkpoint only where the stop does: the stop then always falls
# between two of the run's own checks, where the ranks' statistics differ.
UNCHECKED = {"check_every": 0, "checkpoint_every": 0}


def start_cli(cfg: RunConfig, tmp_path: Path, address: str) -> subprocess.Popen:
    """`distrib train` on cfg, joined to this module's Ray instance at `address` (ray_address)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(cfg)))
    return subprocess.Popen([sys.executable, "-m", "distrib", "train", "--config", str(path), "--no-progress",
                             "--address", address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(run_dir: Path, count: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} steps after {timeout_s} s")


def steps_in(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory) -> dict:
    with Orchestrator(stop_cfg(tmp_path_factory.mktemp("ref") / "run", **UNCHECKED), progress=False) as orch:
        orch.train()
        return flat_state(orch.state())


# Either signal sets the same stop; the resume after it (a run of its own) is tested after one.
@pytest.mark.parametrize(("signum", "exit_code", "resume"), [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)])
def test_signal_saves_at_the_step_boundary_and_resume_is_exact(tmp_path, request, ray_address, signum, exit_code,
                                                                resume):
    run_dir = tmp_path / "run"
    proc = start_cli(stop_cfg(run_dir, **UNCHECKED), tmp_path, ray_address)
    wait_for_steps(run_dir, 6, proc)
    signalled = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    took_s = time.monotonic() - signalled
    assert proc.returncode == exit_code, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(rf"distrib: stopped by {signum.name} after (\d+) steps; checkpoint (step-\d+\.ckpt) "
                         rf"written; resume with: distrib train --resume {re.escape(str(run_dir))}", last)
    assert match, stderr[-3000:]
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr  # no crash dump for an orderly stop
    done = int(match[1])
    ckpt, _ = checkpoint.newest_valid(run_dir)
    assert ckpt.step == done and ckpt.path.name == match[2]
    assert steps_in(run_dir) == list(range(done))  # every step finished, none past the checkpoint
    assert took_s < 30
    if not resume:
        return

    uninterrupted = request.getfixturevalue("uninterrupted")
    with Orchestrator(stop_cfg(run_dir, **UNCHECKED), progress=False, resume_dir=run_dir) as orch:
        assert orch.step_count == done  # 0 steps redone
        orch.train()
        resumed = flat_state(orch.state())
    assert_bit_identical(resumed, uninterrupted)


def test_a_signal_once_the_last_steps_are_queued_ends_a_finished_run(tmp_path, ray_address):
    """After 3 of 4 steps the last is already queued (calls_in_flight 2), and rank 0 takes it
    slowly: SIGTERM then lets it run with the run's end, so the run is done (exit 0, summary
    written), and a resume of it is refused in one line before Ray starts, not run to rewrite
    the summary with nothing."""
    run_dir = tmp_path / "run"
    proc = start_cli(stop_cfg(run_dir, steps=4, faults="slow:0@3", **UNCHECKED), tmp_path, ray_address)
    wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "distrib: SIGTERM came as the run ended: all 4 steps done" in stderr
    assert steps_in(run_dir) == [0, 1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    summary = (run_dir / "summary.json").read_bytes()

    resumed = subprocess.run([sys.executable, "-m", "distrib", "train", "--resume", str(run_dir), "--no-progress"],
                             capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert resumed.stderr.strip().endswith("the run is done; raise steps (--set steps=N) to train on")
    assert len(resumed.stderr.strip().splitlines()) == 1 and "Ray" not in resumed.stderr
    assert (run_dir / "summary.json").read_bytes() == summary


def test_an_orderly_end_lets_the_replicas_exit_rather_than_killing_them(tmp_path):
    """ray.kill sends SIGTERM first, and Ray's handler for it, landing inside a garbage-collector
    callback, printed a traceback after a stopped run's last line (1 run in 12). After a run
    that went well each replica exits on its own, so none is sent a signal."""
    with keep_warm(False), Orchestrator(stop_cfg(tmp_path / "run", steps=2, **UNCHECKED), progress=False) as orch:
        orch.train()
        actor_ids = [replica._actor_id.hex() for replica in orch.replicas]
    # The public state API (ray.util.state) needs the dashboard, which these tests do not start.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        infos = [ray._private.state.actors(actor_id) for actor_id in actor_ids]
        if all(info["State"] == "DEAD" for info in infos):
            break
        time.sleep(0.1)
    causes = [str(info["DeathCause"]) for info in infos]
    assert len(causes) == 2
    for cause in causes:
        assert "INTENDED_USER_EXIT" in cause and "RAY_KILL" not in cause, cause


def test_reading_the_state_between_checks_changes_no_number(tmp_path):
    """A state read is a check (a fingerprint) and a copy. At a step where the run does not
    check, it leaves every rank's own BatchNorm statistics as they were: the run ends
    bit-identical to one never read."""
    cfg = stop_cfg(tmp_path / "ref", steps=6)
    with Orchestrator(cfg, progress=False) as orch:
        orch.train()
        reference = flat_state(orch.state())
    with Orchestrator(cfg.replace(run_dir=str(tmp_path / "read")), progress=False) as orch:
        orch.train(num_steps=5)  # between the run's checks at 4 and its end
        orch.state()
        orch.train()
        assert_bit_identical(flat_state(orch.state()), reference)


def test_second_signal_stops_at_once_and_keeps_the_checkpoint(tmp_path, ray_address):
    """Rank 0 hangs at step 5, so the graceful stop cannot finish; the second SIGTERM ends it."""
    run_dir = tmp_path / "run"
    proc = start_cli(stop_cfg(run_dir, faults="stall:0@5"), tmp_path, ray_address)
    wait_for_steps(run_dir, 5, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None  # still waiting for the stalled step
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - signalled < 10
    assert proc.returncode == 143, stderr[-3000:]
    assert re.search(r"distrib: stopped at once by a second SIGTERM after 5 steps; the newest checkpoint is "
                     r"step-00000004\.ckpt; resume with: distrib train --resume ", stderr), stderr[-3000:]
    ckpt, skipped = checkpoint.newest_valid(run_dir)
    assert ckpt.step == 4 and not skipped


def test_stop_grace_bounds_a_stop_that_cannot_finish(tmp_path, ray_address):
    run_dir = tmp_path / "run"
    proc = start_cli(stop_cfg(run_dir, faults="stall:1@5", stop_grace_s=2.0), tmp_path, ray_address)
    wait_for_steps(run_dir, 5, proc)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert 2.0 <= time.monotonic() - signalled < 15
    assert proc.returncode == 143, stderr[-3000:]
    assert re.search(r"distrib: stopped by SIGTERM after 5 steps without a new checkpoint \(.*stop_grace_s=2\.0.*\);"
                     r" the newest checkpoint is step-00000004\.ckpt", stderr), stderr[-3000:]
    assert checkpoint.newest_valid(run_dir)[0].step == 4
