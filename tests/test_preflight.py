"""Fail fast: what can never run is a one-line error (exit 2) before Ray starts, and no run
directory is left behind (the CLI, as a user runs it; no Ray instance is started here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distrib import preflight


def train(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local instance would be started
    args = [sys.executable, "-m", "distrib", "train", "--no-progress", "--set", "device=cpu"]
    for override in overrides:
        args += ["--set", override]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def assert_one_line_error(done: subprocess.CompletedProcess, *parts: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distrib: error: "), done.stderr[-2000:]
    for part in parts:
        assert part in lines[0], lines[0]
    assert "Started a local Ray instance" not in done.stderr + done.stdout  # Ray never started


def test_more_workers_than_a_local_instance_has_cpus(tmp_path):
    workers = (os.cpu_count() or 1) + 1
    done = train(tmp_path, f"num_workers={workers}", "run_dir=run")
    assert_one_line_error(done, f"{workers} workers x 1 CPU need {workers} CPUs; this machine has {os.cpu_count()}")
    assert not (tmp_path / "run").exists()


def test_spares_count_against_the_local_cpus(tmp_path):
    cpus = os.cpu_count() or 1
    done = train(tmp_path, f"num_workers={cpus}", "spare_workers=1", "run_dir=run")
    assert_one_line_error(done, f"{cpus + 1} workers (with 1 spare) x 1 CPU need {cpus + 1} CPUs")


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    done = train(tmp_path, "run_dir=taken/run")
    assert_one_line_error(done, "run_dir: 'taken/run' is invalid", "is a file, not a directory")


def test_missing_weights_file(tmp_path):
    done = train(tmp_path, "weights=missing.pth", "num_classes=10", "run_dir=run")
    assert_one_line_error(done, "weights: 'missing.pth' is invalid: no such file")
    assert not (tmp_path / "run").exists()


def test_cuda_on_a_local_instance_without_gpus(tmp_path):
    if preflight.local_gpus() != 0:
        pytest.skip("this machine may have GPUs")
    done = train(tmp_path, "device=cuda", "precision=bf16", "run_dir=run")
    assert_one_line_error(done, "device: cuda needs 2 GPUs; this machine has 0 (a local Ray instance)")
    done = train(tmp_path, "device=cuda", "gpus_per_worker=0.4", "num_workers=5", "cpus_per_worker=0.2", "run_dir=run")
    assert_one_line_error(done, "device: cuda needs 3 GPUs at 0.4 per worker; this machine has 0")
