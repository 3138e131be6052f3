"""Fail fast, timed: seconds from `distrib train` starting to its exit with a one-line error,
for each config that can never run and that preflight catches before Ray starts.

The goal is under 2 s each, with no Ray started: Python's start and distrib's imports are
most of it. Each case runs the CLI as a user would, in a fresh temp dir, without RAY_ADDRESS
(a local instance would be started), and the table shows whether Ray started after all.
The cuda case fails only on a machine without GPUs. A cluster joined by address that has no
autoscaler fails after connecting, which needs a cluster: tests/test_preflight.py times it.

    .venv/bin/python bench/failfast.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def folder_without_classes(root: Path) -> list[str]:
    (root / "images").mkdir()
    (root / "images" / "loose.png").write_bytes(b"")  # an image, but in no class folder
    return ["data=folder", "data_dir=images", "num_classes=2"]


def folder_of_one_image_per_class(root: Path) -> list[str]:
    for name in ("cat", "dog"):
        (root / "images" / name).mkdir(parents=True)
        (root / "images" / name / "0.png").write_bytes(b"")  # preflight counts files; it decodes none
    return ["data=folder", "data_dir=images", "num_classes=2", "val_fraction=0.5"]


def run_dir_under_a_file(root: Path) -> list[str]:
    (root / "taken").write_text("not a directory")
    return ["run_dir=taken/run"]


CASES: list[tuple[str, Callable[[Path], list[str]]]] = [
    ("device: cuda, no GPU here", lambda root: ["device=cuda"]),
    ("more workers than CPUs", lambda root: [f"num_workers={(os.cpu_count() or 1) + 1}"]),
    ("run_dir under a file", run_dir_under_a_file),
    ("missing weights file", lambda root: ["weights=missing.pth", "num_classes=10"]),
    ("data_dir without class folders", folder_without_classes),
    ("val_fraction empties a class", folder_of_one_image_per_class),
    ("unknown key", lambda root: ["colour=blue"]),
]


def run(overrides: list[str], cwd: Path) -> tuple[float, int, str, bool]:
    """Seconds to exit, exit code, the last stderr line, and whether a Ray instance started."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "distrib", "train", "--no-progress"]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    seconds = time.perf_counter() - started
    lines = done.stderr.strip().splitlines()
    return seconds, done.returncode, lines[-1] if lines else "", "Started a local Ray instance" in done.stderr


def main() -> None:
    rows = []
    for name, setup in CASES:
        with tempfile.TemporaryDirectory(prefix="failfast-") as tmp:
            rows.append((name, *run(setup(Path(tmp)), Path(tmp))))
    print(f"{'case':32} {'s':>5} {'exit':>4} {'Ray':>3}  message")
    for name, seconds, code, message, ray_started in rows:
        print(f"{name:32} {seconds:5.2f} {code:4d} {'yes' if ray_started else 'no':>3}  {message}")


if __name__ == "__main__":
    main()
