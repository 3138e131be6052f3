"""When the lockstep loop checks, snapshots and evaluates, and how many steps each call runs.

Pure and stateless: a function of the config and the steps done, so a resumed or
recovered run keeps the same rhythm as an uninterrupted one.
"""

from __future__ import annotations

from typing import Literal

from distrib.config import RunConfig

BoundaryCall = Literal["check", "checkpoint", "eval"]


def _at(every: int, steps_done: int) -> bool:
    return bool(every) and steps_done % every == 0


def boundary_calls(cfg: RunConfig, steps_done: int) -> list[BoundaryCall]:
    """What runs once `steps_done` steps are finished, in order: a checkpoint (which checks
    the replicas first) or a plain check, then an evaluation. The run's end always checks,
    and evaluates when evaluation is on."""
    calls: list[BoundaryCall] = []
    end = steps_done == cfg.steps
    if _at(cfg.checkpoint_every, steps_done):
        calls.append("checkpoint")
    elif _at(cfg.check_every, steps_done) or end:
        calls.append("check")
    if cfg.eval_every and (_at(cfg.eval_every, steps_done) or end):
        calls.append("eval")
    return calls


def averages_buffers(cfg: RunConfig, steps_done: int) -> bool:
    """Whether the ranks take the mean of their BatchNorm running statistics as their own when
    observed after `steps_done` steps (batchnorm: train, see bnstats.py): at the run's own checks
    and checkpoints only, so that a stop, a read or a heal's check elsewhere changes nothing."""
    return _at(cfg.checkpoint_every, steps_done) or _at(cfg.check_every, steps_done)


def call_length(cfg: RunConfig, first_step: int, end: int) -> int:
    """Steps in the call from `first_step`: steps_per_call, cut so that every call ends on a
    check, checkpoint or evaluation boundary, and at `end`."""
    count = min(cfg.steps_per_call, end - first_step)
    for every in (cfg.check_every, cfg.checkpoint_every, cfg.eval_every):
        if every:
            count = min(count, every - first_step % every)
    return count


def step_calls_queued(cfg: RunConfig, *, behind_checkpoint: bool) -> int:
    """How many calls of steps the driver keeps queued: calls_in_flight, twice as many while a
    checkpoint heads the queue, so that the replicas do not wait while the driver takes its
    snapshot's bytes (0.2-0.5 s on a GPU node)."""
    return cfg.calls_in_flight * (2 if behind_checkpoint else 1)


def records_kept(cfg: RunConfig) -> int:
    """How many of its latest steps' records a replica keeps for a heal: more than the driver
    can have queued past the last results it has, which is the most a failure leaves unreported
    (a checkpoint that fails after the steps queued behind it ran)."""
    return cfg.steps_per_call * (step_calls_queued(cfg, behind_checkpoint=True) + 1)
