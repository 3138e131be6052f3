"""Checkpoints on disk: atomic writes, integrity checks, the newest valid one, config compatibility.

A checkpoint file is one line of magic, one line of JSON header (step, config, sha256
and size of the payload) and the payload: the replica's `torch.save` bytes of model,
optimizer and scaler state. The driver writes and verifies files without importing
torch; only replicas open the payload (with `weights_only=True`).

There is no hidden RNG state to save: every step's data is a function of (seed,
step) and nothing else draws random numbers, so the step counter is the data position.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from distrib.config import RunConfig, to_dict
from distrib.errors import CheckpointError

MAGIC = b"distrib-checkpoint v1\n"

# Keys a resumed run may change: they decide how the run is driven, not its numbers.
RESUMABLE_KEYS = frozenset({
    "steps", "check_every", "checkpoint_every", "keep_checkpoints", "max_restarts", "steps_per_call",
    "calls_in_flight", "start_timeout_s", "step_timeout_s", "hang_timeout_factor", "hang_timeout_min_s",
    "placement_strategy", "loader_workers", "faults", "run_dir", "stop_grace_s", "eval_every", "eval_size",
    "val_dir", "recovery", "spare_workers", "stall_timeout_s", "tensorboard", "prometheus", "straggler_fraction",
})


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    """Steps done: the resumed run starts at this step."""
    config: dict
    payload: bytes


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def on_disk(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first (each complete: files appear by atomic rename)."""
    return sorted(checkpoint_dir(run_dir).glob("step-*.ckpt"))


def write(run_dir: Path, *, step: int, cfg: RunConfig, payload: bytes, keep: int) -> Path:
    """Write atomically (temporary file, fsync, rename, fsync of the folder), then keep the newest `keep`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    header = {"step": step, "config": to_dict(cfg), "sha256": hashlib.sha256(payload).hexdigest(),
              "size": len(payload)}
    path = folder / f"step-{step:08d}.ckpt"
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(MAGIC)
        f.write(json.dumps(header).encode() + b"\n")
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut only once the folder is synced
    finally:
        os.close(dir_fd)
    for old in on_disk(run_dir)[:-keep]:
        old.unlink()
    return path


def read(path: Path) -> Checkpoint:
    """Read and verify one checkpoint; CheckpointError if truncated, corrupt or not a checkpoint."""
    try:
        with path.open("rb") as f:
            if f.readline() != MAGIC:
                raise CheckpointError(f"{path} is not a distrib checkpoint")
            header = json.loads(f.readline())
            payload = f.read()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable: {err}") from None
    if len(payload) != header.get("size"):
        raise CheckpointError(f"{path} is truncated: {len(payload)} of {header.get('size')} payload bytes")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: its payload does not match its sha256")
    return Checkpoint(path=path, step=header["step"], config=header["config"], payload=payload)


def newest_valid(run_dir: Path) -> tuple[Checkpoint, list[str]]:
    """The newest checkpoint that verifies, and one line per newer one skipped (and why)."""
    skipped = []
    for path in reversed(on_disk(run_dir)):
        try:
            return read(path), skipped
        except CheckpointError as err:
            skipped.append(str(err))
    reasons = f" ({'; '.join(skipped)})" if skipped else ""
    raise CheckpointError(f"no valid checkpoint in {checkpoint_dir(run_dir)}{reasons}; "
                          "a run writes one every checkpoint_every steps")


def check_compatible(checkpoint: Checkpoint, cfg: RunConfig) -> None:
    """CheckpointError naming the first key (outside RESUMABLE_KEYS; steps too under a cosine
    schedule) that differs."""
    current = to_dict(cfg)
    for key, value in checkpoint.config.items():
        # A cosine schedule decays to 0 at `steps`: changing it changes every later step's rate.
        fixed = key == "steps" and cfg.lr_schedule == "cosine"
        if (key not in RESUMABLE_KEYS or fixed) and current.get(key) != value:
            raise CheckpointError(f"{checkpoint.path} is from a different run: {key} is {value!r} there, "
                                  f"{current.get(key)!r} here; resume with the same {key}")
    if checkpoint.step > cfg.steps:
        raise CheckpointError(f"{checkpoint.path} is at step {checkpoint.step}, past steps={cfg.steps}; "
                              "raise steps to go on")
