"""Stragglers: which rank holds the others up, seen from the ranks' own phase times.

In lockstep every rank's step takes as long as the slowest one's: a rank that is late
makes its peers wait inside their next collective, so the totals are equal and the
waiting shows up in the fast ranks' phases, not the slow one's. What tells the ranks
apart is the time *before* a step's first collective, which no peer can stretch: loading
the batch, plus forward when BatchNorm does not synchronise (under `batchnorm: sync`
forward holds collectives). A rank whose lead time exceeds the fastest rank's by more
than `straggler_fraction` of the step, in the median of the last STRAGGLER_WINDOW steps,
is named once, in one line. Pure Python: the driver feeds it each step's rank records.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable

from distrib.config import RunConfig
from distrib.protocol import PHASES, StepRecord

STRAGGLER_WINDOW = 20
"""Steps whose median decides: one slow batch (a cold cache, a checkpoint) names nobody."""


class StragglerWatch:
    """Per-rank phase times over the run, and the ranks named as stragglers."""

    def __init__(self, cfg: RunConfig, *, say: Callable[[str], None], name: Callable[[int], str]):
        self._fraction = cfg.straggler_fraction
        self.lead_phases = ("data_s",) if cfg.batchnorm == "sync" else ("data_s", "forward_s")
        """The phases before a step's first collective."""
        self._say, self._name = say, name
        self._sums: dict[int, dict[str, float]] = {}
        self._counts: dict[int, int] = {}
        self._window: deque[tuple[list[float], float]] = deque(maxlen=STRAGGLER_WINDOW)
        """(each rank's lead time minus the fastest rank's, the step's length) of the latest steps."""
        self.named: list[int] = []
        self._judging = True

    def formed(self, *, whole: bool) -> None:
        """The group was formed again: its ranks may be new or renumbered, so the window starts
        over; while it is not `whole` (shrunk: some ranks train several shards, their lead time
        several shards' by design), nobody is judged."""
        self._window.clear()
        self._judging = whole

    def step(self, rank_records: list[StepRecord], step_s: float) -> None:
        """Take one step every rank finished (rank_records[r] is rank r's), `step_s` its length."""
        for rank, record in enumerate(rank_records):
            sums = self._sums.setdefault(rank, dict.fromkeys(PHASES, 0.0))
            for phase in PHASES:
                sums[phase] += record[phase]
            self._counts[rank] = self._counts.get(rank, 0) + 1
        if not self._judging:
            return
        leads = [sum(r[p] for p in self.lead_phases) for r in rank_records]
        fastest = min(leads)
        self._window.append(([lead - fastest for lead in leads], step_s))
        if self._fraction and len(self._window) == STRAGGLER_WINDOW:
            self._name_stragglers()

    def _name_stragglers(self) -> None:
        step_s = statistics.median(s for _, s in self._window)
        ranks = min(len(behind) for behind, _ in self._window)  # a group resized within the window: the common ranks
        for rank in range(ranks):
            if rank in self.named:
                continue
            behind_s = statistics.median(behind[rank] for behind, _ in self._window)
            if step_s > 0 and behind_s > self._fraction * step_s:
                self.named.append(rank)
                what = " + ".join(p[:-2] for p in self.lead_phases)
                self._say(f"straggler: {self._name(rank)} is {behind_s * 1e3:.0f} ms behind the fastest rank "
                          f"before each step's first collective ({what}), {behind_s / step_s:.0%} of a "
                          f"{step_s * 1e3:.0f} ms step, over the last {STRAGGLER_WINDOW} steps")

    def summary(self) -> dict:
        """Each rank's mean phase times, and the ranks named, for summary.json."""
        ranks = [{"rank": rank, **{p: total / self._counts[rank] for p, total in sums.items()}}
                 for rank, sums in sorted(self._sums.items())]
        return {"phases": list(PHASES), "lead_phases": list(self.lead_phases), "ranks": ranks,
                "named": sorted(self.named)}
