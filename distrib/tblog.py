"""TensorBoard event files of a run, written by the driver (no shared filesystem needed).

    tensorboard --logdir RUN_DIR/tb

Scalars per step: train/loss, train/lr, train/images_per_s and phase/<data, forward,
backward, optimizer, comm>_s; per evaluation: eval/loss, eval/top1, eval/top5; and the
run's config as text. torch's SummaryWriter (which needs the tensorboard package) does
the writing on its own thread; it is imported only when `tensorboard: true`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from distrib.config import RunConfig, to_dict
from distrib.metrics import EvalMetrics, StepMetrics
from distrib.protocol import PHASES


class TensorBoardLog:
    def __init__(self, path: Path, cfg: RunConfig, *, purge_step: int | None = None):
        """`purge_step`: the run goes back to that step (a resume, a restart): TensorBoard drops
        the events of the steps from there on, which are about to be written again."""
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(path), purge_step=purge_step)
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

    def close(self) -> None:
        self._writer.close()
