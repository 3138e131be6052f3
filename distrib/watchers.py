"""What watches a run live, fed by the driver as results arrive: the straggler watch (a line
when a rank holds the others up) and, with `prometheus: true`, the Prometheus gauges.

The driver records results (history, metrics.jsonl) and drives the replicas; this is the one
place it hands each step and evaluation to the watchers, so adding one touches no loop code.
"""

from __future__ import annotations

from collections.abc import Callable

from distrib.config import RunConfig
from distrib.metrics import EvalMetrics, StepMetrics
from distrib.prom import RunGauges
from distrib.protocol import StepRecord
from distrib.stragglers import StragglerWatch


class Watchers:
    """The straggler watch and the gauges of one run; create it once Ray is connected."""

    def __init__(self, cfg: RunConfig, *, run_name: str, say: Callable[[str], None], name: Callable[[int], str]):
        self._stragglers = StragglerWatch(cfg, say=say, name=name)
        self._gauges = RunGauges(run_name) if cfg.prometheus else None

    def step(self, metrics: StepMetrics, rank_records: list[StepRecord], *, recoveries: int,
             checks_passed: int) -> None:
        """One finished step; `rank_records[r]` is rank r's record (all ranks unless metrics.partial)."""
        if not metrics.partial:  # a partial step lacks some ranks' records
            self._stragglers.step(rank_records, metrics.step_s)
        if self._gauges is not None:
            self._gauges.step(metrics, rank_records, recoveries=recoveries, checks_passed=checks_passed)

    def formed(self, *, whole: bool) -> None:
        """The group was formed again (a restart, heal or grow); `whole`: it has num_workers ranks."""
        self._stragglers.formed(whole=whole)

    def evaluation(self, metrics: EvalMetrics) -> None:
        if self._gauges is not None:
            self._gauges.evaluation(metrics)

    def flush(self, *, recoveries: int, checks_passed: int) -> None:
        """Publish what is pending (the end of a call to train, or of a failed run)."""
        if self._gauges is not None:
            self._gauges.flush(recoveries=recoveries, checks_passed=checks_passed)

    def summary(self) -> dict:
        """What summary.json holds of them: each rank's phase times and the stragglers named."""
        return {"stragglers": self._stragglers.summary()}
