"""The learning rate of each step: a pure function of (config, step).

Nothing about it is state: a resumed run, a recovered one and one on another number
of workers all compute the same rate for the same step, so the schedule can never
break their equality with an uninterrupted run. Pure Python: the driver records the
rate of each step without torch, and the replicas set it before each step.

    lr_at(cfg, step) = peak x warm-up factor x schedule factor
    peak             = lr                                   (lr_scaling: none)
                     = lr x global batch / base_batch_size  (lr_scaling: linear; Goyal et al. 2017)
"""

from __future__ import annotations

import bisect
import math

from distrib.config import RunConfig


def peak_lr(cfg: RunConfig) -> float:
    """The learning rate after warm-up, before any decay."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * cfg.global_batch_size / cfg.base_batch_size
    return cfg.lr


def lr_at(cfg: RunConfig, step: int) -> float:
    """The learning rate of step `step` (0-based)."""
    peak = peak_lr(cfg)
    if step < cfg.warmup_steps:  # linear from peak / warmup_steps at step 0 to peak at step warmup_steps - 1
        return peak * (step + 1) / cfg.warmup_steps * _milestones_factor(cfg, step)
    if cfg.lr_schedule == "step":
        return peak * _milestones_factor(cfg, step)
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps)
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak


def _milestones_factor(cfg: RunConfig, step: int) -> float:
    """lr_schedule: step's factor at `step`: lr_gamma per milestone passed, counted from step 0
    (a milestone inside the warm-up scales the warm-up's rates too); 1.0 for other schedules."""
    if cfg.lr_schedule != "step":
        return 1.0
    return cfg.lr_gamma ** bisect.bisect_right(cfg.lr_milestones, step)
