"""HangLimit: how long one driver call may take before the driver calls it a hang.

Until a few calls are timed, the limit is step_timeout_s; then it is
hang_timeout_factor x the median step of the latest ones, times the steps in the
call, floored at hang_timeout_min_s (a check, a checkpoint or a slow batch makes a
step longer now and then) and capped at step_timeout_s. The same after the group is
formed again (a restart, a heal, a grow): a new replica's first calls are slow too
(its loaders start, torch.compile and cuDNN's autotuning run again).
"""

from __future__ import annotations

import statistics
from collections import deque

from distrib.config import RunConfig

TIMED_WINDOW_STEPS = 50
"""The median is over this many latest steps."""
MIN_TIMED_CALLS = 3
"""Calls timed since the group was formed before the derived limit replaces step_timeout_s
(the first are slow)."""
STALL_STEPS = 3
"""A rank is stalled once still for this many median steps (and stall_timeout_s)."""


class HangLimit:
    def __init__(self, cfg: RunConfig):
        self._cfg = cfg
        self._step_walls: deque[float] = deque(maxlen=TIMED_WINDOW_STEPS)
        self._timed_calls = 0
        """Calls timed since the group was (last) formed."""

    def formed(self) -> None:
        """The group was formed again: its next calls get step_timeout_s until MIN_TIMED_CALLS
        are timed (the steps timed before still count towards the median)."""
        self._timed_calls = 0

    def record(self, wall_s: float, num_steps: int) -> None:
        """A call of `num_steps` steps finished, `wall_s` per step."""
        self._step_walls.extend([wall_s] * num_steps)
        self._timed_calls += 1

    def limit_s(self, num_steps: int) -> float:
        """Seconds a call of `num_steps` steps may take."""
        cfg = self._cfg
        if self._timed_calls < MIN_TIMED_CALLS:
            return cfg.step_timeout_s
        derived = cfg.hang_timeout_factor * statistics.median(self._step_walls) * num_steps
        return min(cfg.step_timeout_s, max(cfg.hang_timeout_min_s, derived))

    def stall_limit_s(self) -> float | None:
        """Seconds a rank may stay still while a peer moves on (stall.py); None: no stall watch
        (stall_timeout_s: 0, or too few steps timed to know a normal step)."""
        if not self._cfg.stall_timeout_s or self._timed_calls < MIN_TIMED_CALLS:
            return None
        return max(self._cfg.stall_timeout_s, STALL_STEPS * statistics.median(self._step_walls))
