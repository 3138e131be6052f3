"""RunDir: everything under one run directory, and the snapshot a recovery starts from.

    RUN_DIR/config.yaml     the resolved config the run goes on with (what --resume reads)
    RUN_DIR/metrics.jsonl   one line per finished step ("kind": "step") and evaluation ("kind": "eval")
    RUN_DIR/classes.json    the names of the model's output classes, in order
    RUN_DIR/events.jsonl    one line per recovery (heal or restart), with its phase times,
                            and per change of the group's size (shrink, grow)
    RUN_DIR/summary.json    throughput, the step-time breakdown, recoveries and goodput, at the end
    RUN_DIR/checkpoints/    the newest keep_checkpoints snapshots (see checkpoint.py)
    RUN_DIR/tb/             TensorBoard event files, with `tensorboard: true` (see tblog.py)

RUN_DIR is a local folder or an object-storage URI (s3://, gs://, ...: see storage.py). On
object storage metrics.jsonl (and TensorBoard's files) are uploaded in batches (every
METRICS_UPLOAD_S and before each checkpoint), not per step, in parts of at most 4 MiB
(metrics.1.jsonl, ...: storage.PART_BYTES), and checkpoints/latest.json names the newest
complete checkpoint.

The driver's loop says *when* (cadence.py), then calls `save`; this module says *how*:
the snapshot is kept in memory for recovery and serialised and written to disk on a
background thread, one write at a time, in step order. It knows no Ray, and imports torch
only for TensorBoard files and a real replica's snapshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import yaml

from distrib import checkpoint, storage
from distrib.config import RunConfig, to_dict
from distrib.errors import CheckpointError, ConfigError, WriteError, first_line
from distrib.metrics import EvalMetrics, StepMetrics
from distrib.protocol import HostState
from distrib.storage import LineLog, RemotePath

RUN_FILES = ("config.yaml", "metrics.jsonl", "events.jsonl", "classes.json", "summary.json")
RUN_FOLDERS = ("checkpoints", "tb")
"""What a run writes in its directory: a new run refuses a directory that holds any of them."""
METRICS_UPLOAD_S = 10.0
"""On object storage, metrics.jsonl's last part is rewritten whole at most this often (a request per batch)."""
WRITER_NICE = 19
"""The checkpoint writer's nice value (Linux): it hashes and sends ~100 MB a checkpoint with
no step waiting on it, so it takes the CPU that replicas on the driver's machine leave idle."""


def _lower_priority() -> None:
    """Give the calling thread WRITER_NICE (on Linux nice is per thread; elsewhere a no-op)."""
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except OSError:  # a sandbox that forbids it: the writer runs at the driver's priority
            pass


class Snapshot:
    """The replicas' state after `step` steps: `payload` is the bytes a replica's `restore`
    takes, made from a replica's HostState when first asked for (by the checkpoint writer, at
    its low priority, unless a recovery needs them sooner), so that torch is imported and
    torch.save runs off the driver's loop."""

    def __init__(self, step: int, taken: bytes | HostState):
        self.step = step
        self._taken: bytes | HostState = taken
        self._lock = threading.Lock()

    @property
    def payload(self) -> bytes:
        with self._lock:
            if not isinstance(self._taken, bytes):
                from distrib.hostcopy import to_bytes

                self._taken = to_bytes(self._taken)
            return self._taken


class RunDir:
    """One run's directory; make one with `create` or `resume`, and `close` it.

    `cfg` is the run's config with `run_dir` set to this directory's path. `path` is a
    pathlib.Path for a local folder, a storage.RemotePath (str() is its URI) on object storage.
    """

    def __init__(self, path: Path | RemotePath, cfg: RunConfig, *, snapshot: Snapshot | None):
        self.path = path
        self.cfg = cfg.replace(run_dir=str(path))
        self.snapshot = snapshot
        """The newest snapshot (None before the first): where a recovery starts."""
        self._write_config()
        self._metrics = LineLog(path / "metrics.jsonl", upload_every_s=METRICS_UPLOAD_S, create=True)
        self._events = LineLog(path / "events.jsonl", upload_every_s=0.0, create=False)
        self._tensorboard = None
        if self.cfg.tensorboard:
            from distrib.tblog import TensorBoardLog

            # A resume goes on from its snapshot's step: a writer of a run's start would add the config again.
            self._tensorboard = TensorBoardLog(path / "tb", self.cfg, upload_every_s=METRICS_UPLOAD_S,
                                               purge_step=snapshot.step if snapshot is not None else None)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer",
                                          initializer=_lower_priority)
        self._pending_write: Future | None = None
        self._made_dirs: list[Path] = []
        self.newest_written: Path | RemotePath | None = None
        """The checkpoint to resume from: the newest this run wrote whole (verified, on object
        storage), else the one it resumed from; None before either."""
        self.evaluated_steps: set[int] = set()
        """The steps after which an evaluation is recorded in metrics.jsonl (kept by a rewind)."""

    @classmethod
    def create(cls, cfg: RunConfig) -> RunDir:
        """A new run directory at cfg.run_dir (`{time}` filled in); ConfigError if it holds a run."""
        path = storage.locate(cfg.run_dir.format(time=time.strftime("%Y%m%d-%H%M%S")))
        check_new(path)
        # Local folders this start makes, deepest first: a start that fails removes them again.
        made = [] if isinstance(path, RemotePath) else [p for p in (path, *path.parents) if not p.exists()]
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"run_dir: {str(path)!r} cannot be made ({first_line(err)}); choose another "
                              "run_dir") from None
        run = cls(path, cfg, snapshot=None)
        run._made_dirs = made
        return run

    @staticmethod
    def newest_to_resume(path: str | Path | RemotePath, *, say: Callable[[str], None]) -> checkpoint.Checkpoint:
        """The newest checkpoint at `path` that verifies (newer ones that do not are skipped, each
        said); CheckpointError when none does. Needs no Ray: the driver asks before it starts one,
        so a run with nothing to resume fails in a second."""
        ckpt, skipped = checkpoint.newest_valid(storage.locate(path, what="--resume"))
        for reason in skipped:
            say(f"skipping a checkpoint: {reason}")
        return ckpt

    @classmethod
    def resume(cls, path: str | Path | RemotePath, cfg: RunConfig, *, say: Callable[[str], None],
               newest: checkpoint.Checkpoint | None = None) -> RunDir:
        """The run at `path`, rewound to `newest` (default: newest_to_resume); CheckpointError when
        no checkpoint verifies or `cfg` changes the maths. config.yaml is rewritten with `cfg`, so
        what --set changed holds for the next resume."""
        path = storage.locate(path, what="--resume")
        ckpt = newest if newest is not None else cls.newest_to_resume(path, say=say)
        checkpoint.check_compatible(ckpt, cfg.replace(run_dir=str(path)))
        run = cls(path, cfg, snapshot=Snapshot(ckpt.step, ckpt.payload))
        run.newest_written = ckpt.path
        run.rewind(ckpt.step)
        say(f"resuming {path} at step {ckpt.step} from {ckpt.path.name}")
        return run

    def _write_config(self) -> None:
        """The run's first write: ConfigError (one line, the fix) where the store refuses it."""
        text = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        try:
            storage.write_whole(self.path / "config.yaml", [text.encode()])
        except OSError as err:
            raise ConfigError(storage.write_refused(self.path, err)) from None

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, step: int, taken: bytes | HostState) -> None:
        """Keep the snapshot for recovery and write it to RUN_DIR/checkpoints on the background
        thread (serialising, hashing and fsync take ~1 s for resnet18), so the driver goes on
        feeding the replicas meanwhile. Waits for the previous write first: one at a time, in
        step order."""
        snapshot = self.snapshot = Snapshot(step, taken)
        self.flush()  # on object storage, uploads the metrics of the steps before `step` too
        self._pending_write = self._writer.submit(self._write_checkpoint, snapshot)

    def _write_checkpoint(self, snapshot: Snapshot) -> None:
        try:
            self.newest_written = checkpoint.write(self.path, step=snapshot.step, cfg=self.cfg,
                                                   payload=snapshot.payload, keep=self.cfg.keep_checkpoints)
        except (OSError, CheckpointError) as err:
            where = f"{self.path}/checkpoints/step-{snapshot.step:08d}.ckpt"
            raise WriteError(f"the checkpoint {where} could not be written ({first_line(err)}); those before it "
                             f"stand: free space or fix the store, then resume with: distrib train --resume "
                             f"{self.path}") from err

    def flush(self) -> None:
        """Upload the metrics not yet uploaded (object storage), and wait for the checkpoint being
        written, raising its error if it failed."""
        self._metrics.flush()
        if self._tensorboard is not None:
            self._tensorboard.upload()
        if self._pending_write is not None:
            pending, self._pending_write = self._pending_write, None
            pending.result()

    # ---- records -----------------------------------------------------------------------------
    def write_metrics(self, metrics: StepMetrics | EvalMetrics) -> None:
        self._metrics.append(json.dumps(asdict(metrics)))
        if isinstance(metrics, EvalMetrics):
            self.evaluated_steps.add(metrics.step)
        if self._tensorboard is not None:
            self._tensorboard.write(metrics)

    def rewind(self, step: int) -> None:
        """Forget the metrics of steps from `step` on: they are about to be run again."""
        self.evaluated_steps = set()

        def kept(line: str) -> bool:
            record = json.loads(line)
            if record["step"] < step and record.get("kind") == "eval":
                self.evaluated_steps.add(record["step"])
            return record["step"] < step

        self._metrics.keep(kept)
        if self._tensorboard is not None:
            from distrib.tblog import TensorBoardLog

            self._tensorboard.close()
            self._tensorboard = TensorBoardLog(self.path / "tb", self.cfg, upload_every_s=METRICS_UPLOAD_S,
                                               purge_step=step)

    def record_event(self, event: dict) -> None:
        """Append one line to RUN_DIR/events.jsonl (a recovery: ranks, nodes, step, cause, times)."""
        self._events.append(json.dumps(event))

    def write_json(self, name: str, value) -> None:
        """RUN_DIR/name as indented JSON (summary.json, classes.json)."""
        storage.write_whole(self.path / name, [json.dumps(value, indent=2).encode() + b"\n"])

    def close(self) -> None:
        """Finish the checkpoint being written (never cut short) and close the metrics files."""
        self._writer.shutdown(wait=True)
        self._metrics.close()
        self._events.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def discard(self) -> None:
        """Remove what this run wrote, after a start that failed before any step: the files of a
        run, and the folders `create` made (run_dir and any parents; one that was there stays)."""
        self.close()
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        if isinstance(self.path, RemotePath):  # no folders there; TensorBoard's files, by name
            tb = self.path / "tb"
            for file in tb.iterdir():
                file.unlink(missing_ok=True)
            return
        shutil.rmtree(self.path / "tb", ignore_errors=True)
        for folder in self._made_dirs:  # deepest first; one that something else wrote into stays
            with contextlib.suppress(OSError):  # the start's own error is the one to report
                if not any(folder.iterdir()):
                    folder.rmdir()


def check_new(path: Path | RemotePath) -> None:
    """ConfigError unless `path` may take a new run: it must not hold a run (resume that instead),
    nor a file or folder a run writes, which a start that fails would remove (discard)."""
    if (path / "metrics.jsonl").exists():
        raise ConfigError(f"run_dir: {str(path)!r} already holds a run (metrics.jsonl); "
                          "choose another run_dir, remove it, or resume it with --resume")
    held = next((name for name in RUN_FILES + RUN_FOLDERS if (path / name).exists()), None)
    if held is not None:
        raise ConfigError(f"run_dir: {str(path)!r} already holds {held}, which a run writes; "
                          "choose another run_dir, or move it away")

