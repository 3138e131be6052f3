"""Per-step metrics: how the driver combines the replicas' step records, and the run's summary.

Pure Python (no torch, no ray), so the driver stays light and the maths is unit-testable.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from distrib.protocol import PHASES, EvalRecord, StepRecord


@dataclass(frozen=True, kw_only=True)
class StepMetrics:
    """One step over the global batch, as the driver saw it."""

    kind: str = "step"
    step: int
    finished_at: float
    """Unix time at which the driver had every rank's result."""
    loss: float
    """Loss over the global batch: mean for cross_entropy, sum for the sum loss."""
    lr: float
    """The learning rate of this step (see schedule.py)."""
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
    partial: bool = False
    """True for a step every rank finished but whose results reached the driver from some
    ranks only (the others were lost right after it): loss and times are theirs."""


@dataclass(frozen=True, kw_only=True)
class EvalMetrics:
    """The held-out set, evaluated after `step` (the last step finished before it)."""

    kind: str = "eval"
    step: int
    finished_at: float
    count: int
    """Held-out images evaluated."""
    loss: float
    """Mean cross-entropy over them."""
    top1: float
    top5: float
    eval_s: float
    """Driver's wall time for the evaluation."""


def combine_evals(*, step: int, rank_records: list[EvalRecord], eval_s: float, finished_at: float) -> EvalMetrics:
    """Add each rank's counts: the result does not depend on how the set was split."""
    count = sum(r["count"] for r in rank_records)
    return EvalMetrics(step=step, finished_at=finished_at, count=count, eval_s=eval_s,
                       loss=sum(r["loss_sum"] for r in rank_records) / count,
                       top1=sum(r["top1"] for r in rank_records) / count,
                       top5=sum(r["top5"] for r in rank_records) / count)


def aggregate(*, step: int, rank_records: list[StepRecord], loss_kind: str, global_batch_size: int,
              wall_s: float, finished_at: float, lr: float, partial: bool = False) -> StepMetrics:
    """Combine each rank's record of one step. Phase times are the mean over ranks."""
    losses = [r["loss"] for r in rank_records]
    loss = sum(losses) if loss_kind == "sum" else sum(losses) / len(losses)
    phases = {p: statistics.fmean(r[p] for r in rank_records) for p in (*PHASES, "comm_s")}
    return StepMetrics(step=step, finished_at=finished_at, loss=loss, wall_s=wall_s, lr=lr, partial=partial,
                       images_per_s=global_batch_size / wall_s if wall_s > 0 else 0.0,
                       step_s=max(sum(r[p] for p in PHASES) for r in rank_records), **phases)


def summarize(history: list[StepMetrics], evals: list[EvalMetrics] = (), *, global_batch_size: int,
              warmup_steps: int = 1) -> dict:
    """Throughput and mean phase times, leaving out the first `warmup_steps` (when more remain),
    and the final and best held-out results when there are `evals`."""
    timed = history[warmup_steps:] if len(history) > warmup_steps else history
    wall = sum(m.wall_s for m in timed)
    held_out = {}
    if evals:
        held_out = {"final_top1": evals[-1].top1, "final_top5": evals[-1].top5, "final_eval_loss": evals[-1].loss,
                    "best_top1": max(e.top1 for e in evals), "evals": len(evals)}
    return {
        "steps": len(history),
        "timed_steps": len(timed),
        "final_loss": history[-1].loss if history else None,
        "images_per_s": global_batch_size * len(timed) / wall if wall > 0 else 0.0,
        "step_s": statistics.fmean(m.wall_s for m in timed) if timed else 0.0,
        **{p: statistics.fmean(getattr(m, p) for m in timed) if timed else 0.0 for p in (*PHASES, "comm_s")},
        "driver_overhead_s": statistics.fmean(max(0.0, m.wall_s - m.step_s) for m in timed) if timed else 0.0,
        **held_out,
    }


def format_summary(summary: dict) -> str:
    """Two human lines: throughput, then where a step's time goes."""
    step_ms = summary["step_s"] * 1e3
    parts = ", ".join(f"{p[:-2]} {summary[p] * 1e3:.1f} ms" for p in PHASES)
    held_out = (f"\nheld-out top-1 {summary['final_top1']:.4f} (best {summary['best_top1']:.4f}), "
                f"top-5 {summary['final_top5']:.4f}, loss {summary['final_eval_loss']:.4f}"
                if "final_top1" in summary else "")
    return (f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
            f"{summary['images_per_s']:.1f} images/s\n"
            f"step {step_ms:.1f} ms (driver wall): {parts}{held_out}")
