"""Simulated replicas (simreplica.py) through the real Orchestrator, with real Ray actors: checks
compare their fingerprints, a killed one is healed by the driver's own recovery, and
`distrib simulate` prints its figures, or refuses bad input before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import ray

from distrib import DivergenceError, Orchestrator
from distrib.simulate import sim_config

WORKERS = 16


# The shared local Ray instance: 16 simulated replicas reserve 0.01 CPU each. (Per test: the
# bad-input tests must not start it.)
ray_local = pytest.mark.usefixtures("ray_local")


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@ray_local
def test_sixteen_simulated_replicas_train_with_checks(tmp_path):
    cfg = sim_config(WORKERS, step_ms=2, steps=12, steps_per_call=2, calls_in_flight=2, check_every=4,
                     run_dir=str(tmp_path / "run"))
    with Orchestrator(cfg, progress=False) as orch:
        orch.train()
        assert orch.checks_passed == 4  # at start-up, after steps 3, 7 and 11
        assert {n.device_name for n in orch.nodes} == {"simulated"}
        # The fingerprints follow the steps: a replica one step behind would fail a check.
        ahead = ray.get(orch.replicas[0].run_steps.remote(12, 1))
        assert [r["step"] for r in ahead] == [12]
        with pytest.raises(DivergenceError, match="rank 1 .* differs from rank 0"):
            orch.check_consistency()
    steps = [m for m in lines(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "step"]
    assert [m["step"] for m in steps] == list(range(12))
    # A step that overran (the machine busy) leaves the next one less of its sleep: the steps of
    # a call, not each step, last at least steps_per_call x 2 ms.
    assert all(a["step_s"] + b["step_s"] >= 0.004 for a, b in zip(steps[::2], steps[1::2]))
    assert steps[-1]["loss"] < steps[0]["loss"]


@ray_local
def test_a_killed_simulated_replica_is_healed(tmp_path):
    run_dir = tmp_path / "run"
    cfg = sim_config(WORKERS, step_ms=2, steps=10, steps_per_call=1, calls_in_flight=2, check_every=5,
                     run_dir=str(run_dir), faults="kill:3@4")
    with Orchestrator(cfg, progress=False) as orch:
        orch.train()
        assert orch.restarts == 1
    (event,) = lines(run_dir / "events.jsonl")
    assert event["event"] == "heal" and event["ranks"] == [3] and event["replaced"] == {"3": "fresh"}, event
    assert event["steps_redone"] == 0
    assert [m["step"] for m in lines(run_dir / "metrics.jsonl")] == list(range(10))  # each step once


@ray_local
def test_simulate_command_prints_the_figures(ray_address):
    done = subprocess.run([sys.executable, "-m", "distrib", "simulate", "--workers", "4", "--step-ms", "5",
                           "--steps", "20", "--address", ray_address],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for figure in ("driver cost per step:", "steps per second:", "calls per second:", "last result -> next call"):
        assert figure in done.stdout, done.stdout


@ray_local
def test_checkpoints_closer_than_the_queued_steps_each_hold_their_own_step(tmp_path):
    """With a checkpoint after every step, the driver queues the next checkpoints' snapshots
    before it takes the first one's: each file must still hold the state after its own step
    (it held a later one, by up to 4 steps, when the replica handed over the snapshot begun last)."""
    from distrib import checkpoint
    from distrib.simreplica import snapshot_step

    cfg = sim_config(2, step_ms=2, steps=24, steps_per_call=1, calls_in_flight=2, check_every=0,
                     run_dir=str(tmp_path / "run")).replace(checkpoint_every=1, keep_checkpoints=100)
    with Orchestrator(cfg, progress=False) as orch:
        orch.train()
    saved = [checkpoint.read(path) for path in checkpoint.on_disk(tmp_path / "run")]
    assert [c.step for c in saved] == list(range(1, 25))
    assert [snapshot_step(c.payload) for c in saved] == list(range(1, 25))


@pytest.mark.parametrize(("args", "message"), [
    (["--sweep", "2,x"], "--sweep '2,x' is invalid: give comma-separated integers"),
    (["--sweep", "2,"], "--sweep '2,' is invalid"),
    (["--workers", "2", "--steps-per-call", "a"], "--steps-per-call 'a' is invalid"),
    (["--workers", "2", "--step-ms", "0"], "--step-ms: 0.0 is invalid: must be a finite number > 0"),
    (["--workers", "2", "--step-ms", "-1"], "--step-ms: -1.0 is invalid"),
    (["--workers", "2", "--step-ms", "inf"], "--step-ms: inf is invalid: must be a finite number > 0"),
    (["--workers", "0"], "num_workers: 0 is invalid: must be >= 1"),
    (["--sweep", "2,4", "--steps-per-call", "4,4"], "--steps-per-call 4,4 is invalid: a value is given twice"),
    (["--sweep", "2,2"], "--sweep 2,2 is invalid: a value is given twice"),
    (["--workers", "2", "--steps", "2"], "steps: 2 is invalid: it leaves no step after the 2 warm-up steps"),
    (["--sweep", "2,4", "--steps-per-call", "1,8", "--steps", "12"], "after the 16 warm-up steps (steps_per_call=8)"),
    (["--sweep", "2,4", "--out", "FILE"], "--out 'FILE' is invalid: 'FILE' is a file, not a folder"),
    (["--sweep", "2,4", "--out", "FILE/sim"], "--out 'FILE/sim' is invalid: 'FILE' is a file, not a folder"),
])
def test_simulate_refuses_bad_input_before_ray(tmp_path, capsys, monkeypatch, args, message):
    from distrib import cli

    def start_ray(address, workers):
        raise AssertionError("start_ray was called before the bad input was found")

    monkeypatch.setattr("distrib.simulate.start_ray", start_ray)
    (tmp_path / "FILE").write_text("")
    args = [arg.replace("FILE", str(tmp_path / "FILE")) for arg in args]
    assert cli.main(["simulate", "--step-ms", "5", *args]) == 2
    err = capsys.readouterr().err
    assert message.replace("FILE", str(tmp_path / "FILE")) in err and len(err.splitlines()) == 1, err
