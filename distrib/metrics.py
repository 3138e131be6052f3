"""Per-step metrics: what replicas report, how the driver aggregates them, and the run's summary.

Pure Python (no torch, no ray), so the driver stays light and the maths is unit-testable.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

PHASES = ("data_s", "forward_s", "backward_s", "optimizer_s")
"""Phases of a replica's step, in seconds; backward_s includes DDP's all-reduce, which overlaps it."""


@dataclass(frozen=True, kw_only=True)
class StepMetrics:
    """One step over the global batch, as the driver saw it."""

    step: int
    finished_at: float
    """Unix time at which the driver had every rank's result."""
    loss: float
    """Loss over the global batch: mean for cross_entropy, sum for the sum loss."""
    images_per_s: float
    """Global batch over the driver's wall time for this step."""
    wall_s: float
    """Driver's wall time for this step (its share of a multi-step call)."""
    step_s: float
    """Slowest rank's time inside the step."""
    data_s: float
    forward_s: float
    backward_s: float
    optimizer_s: float
    comm_s: float = 0.0
    """Mean over ranks of the all-reduce window (first bucket sent to last received); it
    overlaps backward_s. 0 at world size 1."""


def aggregate(*, step: int, rank_records: list[dict], loss_kind: str, global_batch_size: int,
              wall_s: float, finished_at: float) -> StepMetrics:
    """Combine each rank's record of one step. Phase times are the mean over ranks."""
    losses = [r["loss"] for r in rank_records]
    loss = sum(losses) if loss_kind == "sum" else sum(losses) / len(losses)
    phases = {p: statistics.fmean(r[p] for r in rank_records) for p in (*PHASES, "comm_s")}
    return StepMetrics(step=step, finished_at=finished_at, loss=loss, wall_s=wall_s,
                       images_per_s=global_batch_size / wall_s if wall_s > 0 else 0.0,
                       step_s=max(sum(r[p] for p in PHASES) for r in rank_records), **phases)


def summarize(history: list[StepMetrics], *, global_batch_size: int, warmup_steps: int = 1) -> dict:
    """Throughput and mean phase times, leaving out the first `warmup_steps` (when more remain)."""
    timed = history[warmup_steps:] if len(history) > warmup_steps else history
    wall = sum(m.wall_s for m in timed)
    return {
        "steps": len(history),
        "timed_steps": len(timed),
        "final_loss": history[-1].loss if history else None,
        "images_per_s": global_batch_size * len(timed) / wall if wall > 0 else 0.0,
        "step_s": statistics.fmean(m.wall_s for m in timed) if timed else 0.0,
        **{p: statistics.fmean(getattr(m, p) for m in timed) if timed else 0.0 for p in (*PHASES, "comm_s")},
        "driver_overhead_s": statistics.fmean(max(0.0, m.wall_s - m.step_s) for m in timed) if timed else 0.0,
    }


def format_summary(summary: dict) -> str:
    """Two human lines: throughput, then where a step's time goes."""
    step_ms = summary["step_s"] * 1e3
    parts = ", ".join(f"{p[:-2]} {summary[p] * 1e3:.1f} ms" for p in PHASES)
    return (f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
            f"{summary['images_per_s']:.1f} images/s\n"
            f"step {step_ms:.1f} ms (driver wall): {parts}")


class MetricsLog:
    """Appends one JSON line per step to RUN_DIR/metrics.jsonl, flushed per write."""

    def __init__(self, path: Path):
        self.path = path
        self._file: IO[str] = path.open("a")

    def truncate(self, step: int) -> None:
        """Keep only the lines of steps before `step` (they are about to be run again)."""
        self._file.close()
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] < step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self._file = self.path.open("a")

    def write(self, metrics: StepMetrics) -> None:
        self._file.write(json.dumps(asdict(metrics)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
