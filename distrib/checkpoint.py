"""Checkpoints in a run directory (local or object storage, see storage.py): whole writes, integrity
checks, the "latest" marker, the newest valid one, config compatibility.

A checkpoint file is one line of magic, one line of JSON header (step, config, sha256
and size of the payload) and the payload: the `torch.save` bytes of rank 0's model,
optimizer and scaler state (made from its flat copy by hostcopy.to_bytes, on the driver's
checkpoint writer thread). The driver's loop writes and verifies files without importing
torch; only replicas and export open the payload (with `weights_only=True`).

There is no hidden RNG state to save: every step's data is a function of (seed,
step) and nothing else draws random numbers, so the step counter is the data position.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from distrib import storage
from distrib.config import RunConfig, to_dict
from distrib.errors import CheckpointError
from distrib.storage import RemotePath

MAGIC = b"distrib-checkpoint v1\n"
MARKER = "latest.json"
"""On object storage, the checkpoint to trust: written after the file it names verifies."""

# Keys a resumed run may change: they decide how the run is driven, not its numbers.
RESUMABLE_KEYS = frozenset({
    "steps", "check_every", "checkpoint_every", "keep_checkpoints", "max_restarts", "steps_per_call",
    "calls_in_flight", "start_timeout_s", "step_timeout_s", "hang_timeout_factor", "hang_timeout_min_s",
    "placement_strategy", "loader_workers", "faults", "run_dir", "stop_grace_s", "eval_every", "eval_size",
    "val_dir", "recovery", "spare_workers", "stall_timeout_s", "elastic_wait_s", "tensorboard", "prometheus",
    "straggler_fraction",
})


@dataclass(frozen=True)
class Checkpoint:
    path: Path | RemotePath
    step: int
    """Steps done: the resumed run starts at this step."""
    config: dict
    payload: bytes


def checkpoint_dir(run_dir: str | Path | RemotePath) -> Path | RemotePath:
    return storage.locate(run_dir) / "checkpoints"


def on_disk(run_dir: str | Path | RemotePath) -> list[Path | RemotePath]:
    """The run's checkpoint files, oldest first (locally each is complete: files appear by atomic
    rename; on object storage see `newest_valid`)."""
    return sorted(checkpoint_dir(run_dir).glob("step-*.ckpt"))


def write(run_dir: str | Path | RemotePath, *, step: int, cfg: RunConfig, payload: bytes,
          keep: int) -> Path | RemotePath:
    """Write step's checkpoint whole, then keep the newest `keep`.

    Locally: temporary file, fsync, rename, fsync of the folder. On object storage, which has no
    rename: the object under its final name (it appears only once complete), read back and
    compared with the bytes sent, then the MARKER naming it, written last; only then are older ones deleted. A
    crash before the marker leaves the previous checkpoint the newest valid one."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    sha256 = hashlib.sha256(payload).hexdigest()
    header = {"step": step, "config": to_dict(cfg), "sha256": sha256, "size": len(payload)}
    path = folder / f"step-{step:08d}.ckpt"
    chunks = [MAGIC, json.dumps(header).encode() + b"\n", payload]
    storage.write_whole(path, chunks, durable=True)
    if isinstance(path, RemotePath):
        check_uploaded(path, chunks)  # a failed upload must not become the newest, nor cost the older ones
        marker = {"step": step, "file": path.name, "sha256": sha256}
        storage.write_whole(folder / MARKER, [json.dumps(marker).encode() + b"\n"])
    else:  # a marker copied down from object storage names a checkpoint this run has moved past
        (folder / MARKER).unlink(missing_ok=True)
    # Files named after this one are from a timeline the run left (it resumed from an older
    # checkpoint, so they did not verify, or their marker was never written): they go too.
    files = on_disk(run_dir)
    older = [old for old in files if old.name <= path.name]
    for old in older[:-keep] + [stale for stale in files if stale.name > path.name]:
        old.unlink()
    return path


def check_uploaded(path: Path | RemotePath, chunks: list[bytes]) -> None:
    """CheckpointError unless `path` now holds exactly the concatenated `chunks`: the bytes read
    back are compared with those still in memory, in place (bytes.startswith at each chunk's
    offset: a memcmp, 14 ms for 90 MB, where comparing memoryview slices took 100 ms and
    hashing them again about 0.3 s)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path} is unreadable after its upload: {err}") from None
    starts = [0]
    for chunk in chunks:
        starts.append(starts[-1] + len(chunk))
    if len(data) != starts[-1] or not all(data.startswith(chunk, start) for start, chunk in zip(starts, chunks)):
        raise CheckpointError(f"{path} did not upload whole: the bytes read back differ from those sent")


def read(path: Path | RemotePath) -> Checkpoint:
    """Read and verify one checkpoint; CheckpointError if truncated, corrupt or not a checkpoint."""
    try:
        data = path.read_bytes()
        if data[:len(MAGIC)] != MAGIC:
            raise CheckpointError(f"{path} is not a distrib checkpoint")
        header_end = data.index(b"\n", len(MAGIC)) + 1
        header = json.loads(data[len(MAGIC):header_end])
        payload = data[header_end:]
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable: {err}") from None
    if len(payload) != header.get("size"):
        raise CheckpointError(f"{path} is truncated: {len(payload)} of {header.get('size')} payload bytes")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: its payload does not match its sha256")
    return Checkpoint(path=path, step=header["step"], config=header["config"], payload=payload)


def newest_valid(run_dir: str | Path | RemotePath) -> tuple[Checkpoint, list[str]]:
    """The newest checkpoint that verifies, and one line per newer one skipped (and why).
    Where a MARKER is (object storage), files newer than the one it names are skipped: their
    write never finished. An unreadable marker is skipped, and said."""
    files = on_disk(run_dir)
    skipped = []
    marker = checkpoint_dir(run_dir) / MARKER
    if isinstance(marker, RemotePath) and marker.is_file():  # local writes need none: a rename is atomic
        try:
            newest = json.loads(marker.read_text())["file"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            newest = None  # every file still verifies by its own sha256
            skipped = [f"{marker} is unreadable ({err!r}): every checkpoint is checked by its sha256"]
        if newest is not None:
            skipped = [f"{path} is newer than {MARKER} ({newest}): its write never finished"
                       for path in reversed(files) if path.name > newest]
            files = [path for path in files if path.name <= newest]
    for path in reversed(files):
        try:
            return read(path), skipped
        except CheckpointError as err:
            skipped.append(str(err))
    reasons = f" ({'; '.join(skipped)})" if skipped else ""
    raise CheckpointError(f"no valid checkpoint in {checkpoint_dir(run_dir)}{reasons}; "
                          "a run writes one every checkpoint_every steps")


def check_compatible(checkpoint: Checkpoint, cfg: RunConfig, *, resolved: bool = True) -> None:
    """CheckpointError naming the first key (outside RESUMABLE_KEYS; steps too under a cosine
    schedule) that differs. `resolved` False: `cfg` may still hold `auto` (before Ray shows the
    cluster), and such keys are left to the check after resolving."""
    current = to_dict(cfg)
    for key, value in checkpoint.config.items():
        # A cosine schedule decays to 0 at `steps`: changing it changes every later step's rate.
        # Under batchnorm: train the ranks average their running statistics at the run's checks
        # and checkpoints (cadence.averages_buffers): other steps would round them otherwise.
        fixed = (key == "steps" and cfg.lr_schedule == "cosine") or (
            key in ("check_every", "checkpoint_every") and cfg.batchnorm == "train" and cfg.num_workers > 1)
        unknown = not resolved and current.get(key) == "auto"
        if (key not in RESUMABLE_KEYS or fixed) and not unknown and current.get(key) != value:
            raise CheckpointError(f"{checkpoint.path} is from a different run: {key} is {value!r} there, "
                                  f"{current.get(key)!r} here; resume with the same {key}")
    if checkpoint.step >= cfg.steps:  # nothing left to train: a resume would only rewrite the summary
        where = "past" if checkpoint.step > cfg.steps else "at"
        raise CheckpointError(f"{checkpoint.path} is at step {checkpoint.step}, {where} steps={cfg.steps}: "
                              "the run is done; raise steps (--set steps=N) to train on")
