"""TensorBoard event files of a run, written by the driver (no shared filesystem needed).

    tensorboard --logdir RUN_DIR/tb

Scalars per step: train/loss, train/lr, train/images_per_s and phase/<data, forward,
backward, optimizer, comm>_s; per evaluation: eval/loss, eval/top1, eval/top5; and the
run's config as text. torch's SummaryWriter (which needs the tensorboard package) does
the writing on its own thread; it is imported only when `tensorboard: true`.

On object storage the writer writes to a local staging folder, and the event files go up
with the metrics: at most every `upload_every_s`, before each checkpoint and at the end. An object
cannot be appended to, so the file being written is uploaded whole each time; past
ROTATE_BYTES the writer starts a new file (TensorBoard reads every file of the folder), so
an upload stays small however long the run.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import yaml

from distrib import storage
from distrib.config import RunConfig, to_dict
from distrib.metrics import EvalMetrics, StepMetrics
from distrib.protocol import PHASES
from distrib.storage import RemotePath

ROTATE_BYTES = 4 << 20
"""On object storage, an event file past this size is finished and a new one started."""


class TensorBoardLog:
    def __init__(self, path: Path | RemotePath, cfg: RunConfig, *, upload_every_s: float,
                 purge_step: int | None = None):
        """`purge_step`: the run goes back to that step (a resume, a restart): TensorBoard drops
        the events of the steps from there on, which are about to be written again.
        `upload_every_s`: on object storage, the least time between two uploads of the files."""
        self._remote = path if isinstance(path, RemotePath) else None
        self._local = Path(tempfile.mkdtemp(prefix="distrib-tb-")) if self._remote is not None else path
        self._uploaded: dict[str, int] = {}  # event file name -> bytes uploaded
        self._upload_every_s, self._uploaded_at = upload_every_s, time.monotonic()
        self._writer = self._open(purge_step)
        if purge_step is None:  # a run's first writer; Markdown: four spaces make the YAML a code block
            config = yaml.safe_dump(to_dict(cfg), sort_keys=False)
            self._writer.add_text("config", "".join(f"    {line}\n" for line in config.splitlines()), global_step=0)

    def write(self, metrics: StepMetrics | EvalMetrics) -> None:
        add, step, at = self._writer.add_scalar, metrics.step, metrics.finished_at
        if isinstance(metrics, EvalMetrics):
            for name in ("loss", "top1", "top5"):
                add(f"eval/{name}", getattr(metrics, name), step, walltime=at)
            return
        add("train/loss", metrics.loss, step, walltime=at)
        add("train/lr", metrics.lr, step, walltime=at)
        add("train/images_per_s", metrics.images_per_s, step, walltime=at)
        for phase in (*PHASES, "comm_s"):
            add(f"phase/{phase}", getattr(metrics, phase), step, walltime=at)
        if self._remote is not None and time.monotonic() - self._uploaded_at >= self._upload_every_s:
            self.upload()

    def upload(self, *, rotate: bool = True) -> None:
        """Object storage: flush the writer and upload each event file that grew since its last
        upload; with `rotate`, start a new file once the current one is past ROTATE_BYTES.
        Locally nothing (the writer flushes on its own)."""
        if self._remote is None:
            return
        self._writer.flush()
        for file in sorted(self._local.iterdir()):
            size = file.stat().st_size
            if self._uploaded.get(file.name) != size:
                storage.write_whole(self._remote / file.name, [file.read_bytes()])
                self._uploaded[file.name] = size
        self._uploaded_at = time.monotonic()
        if rotate and max(self._uploaded.values(), default=0) > ROTATE_BYTES:
            self._writer.close()
            for file in self._local.iterdir():  # each uploaded whole: the staged copies are done with
                file.unlink()
            self._uploaded = {}
            self._writer = self._open(purge_step=None)

    def close(self) -> None:
        self._writer.close()
        if self._remote is not None:
            self.upload(rotate=False)
            shutil.rmtree(self._local, ignore_errors=True)

    def _open(self, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self._local), purge_step=purge_step)
