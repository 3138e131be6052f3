"""The run's figures as Prometheus metrics on Ray's own metrics endpoint (ray.util.metrics).

The driver publishes them: it already holds every figure, and a gauge set in the driver
process is exported by its node's metrics agent like one set in an actor, so no replica
pays for it and no extra server runs. Ray exports each metric as `ray_<name>`, e.g.
`ray_distrib_loss{run="..."}`, adding its own labels (SessionName, NodeAddress, WorkerId,
...); the endpoint is the node's MetricsExportPort (`ray.nodes()`), path /metrics.

All are gauges, running totals included: the driver owns the totals (a resumed run starts
from its own count), so it states them rather than counting increments. Ray's agent drops
a gauge not set for two export intervals (20 s by default), so every publish sets every
gauge again; the figures leave the endpoint that long after the run's last publish.
"""

from __future__ import annotations

import time

import ray
from ray.util.metrics import Gauge

from distrib.metrics import EvalMetrics, StepMetrics
from distrib.protocol import PHASES, StepRecord

RANK_PHASES = (*PHASES, "comm_s")

RUN_FIGURES = {
    "distrib_step": "The last finished step (0-based).",
    "distrib_step_seconds": "Driver's wall time of the last finished step.",
    "distrib_images_per_second": "Global batch over the last finished step's wall time.",
    "distrib_loss": "Loss over the global batch at the last finished step.",
    "distrib_eval_top1": "Held-out top-1 accuracy (0..1) of the latest evaluation.",
    "distrib_recoveries": "Recoveries so far (heals and restarts).",
    "distrib_checks_passed": "Consistency checks passed so far (all replicas bit-identical).",
}
RANK_FIGURES = {f"distrib_rank_{phase[:-2]}_seconds": phase for phase in RANK_PHASES}
"""One gauge per phase, not a `phase` label: OpenTelemetry keeps at most 2000 series per
metric (the rest go to an `otel_metrics_overflow` series), so a phase label would lose
ranks past 400; one gauge per phase holds 2000 ranks."""

METRIC_NAMES = (*RUN_FIGURES, *RANK_FIGURES)
"""Every metric RunGauges publishes, as given to Ray (the endpoint shows them as `ray_<name>`)."""


def default_publish_interval_s() -> float:
    """Half Ray's export interval (metrics_report_interval_ms, floored at 1 s like Ray; 5 s by
    default): nothing is exported faster, and a gauge set this often never outlives Ray's
    two-interval expiry. Setting a gauge costs 2-3 us, so 1000 ranks x 5 phases cost 10-15 ms
    a publish: 0.3% of the driver's time at the default. Ray has no public getter for it."""
    return max(ray._config.metrics_report_interval_ms(), 1000) / 2000


class RunGauges:
    """One run's figures, labelled `run=run_name` (and `rank` for the phase times).

    Create it in the driver once Ray is connected (a value set before ray.init is lost).
    Publishing is throttled: at the first step, then at most once per `publish_interval_s`
    (default: default_publish_interval_s()), it sets the latest figures and each rank's phase
    times averaged over the steps since the last publish; `flush()` publishes at once. Each
    publish sets every gauge again, so ranks that left after a size change drop off with
    Ray's expiry.
    """

    def __init__(self, run_name: str, *, publish_interval_s: float | None = None):
        self._interval_s = default_publish_interval_s() if publish_interval_s is None else publish_interval_s
        self._gauges = {name: Gauge(name, description=text, tag_keys=("run",)) for name, text in RUN_FIGURES.items()}
        self._rank_gauges = {phase: Gauge(name, description=f"This rank's {phase[:-2]} time per step, mean "
                                          "over the steps between two publishes.", tag_keys=("run", "rank"))
                             for name, phase in RANK_FIGURES.items()}
        for gauge in (*self._gauges.values(), *self._rank_gauges.values()):
            gauge.set_default_tags({"run": run_name})
        self._figures: dict[str, float | None] = dict.fromkeys(RUN_FIGURES)
        """The latest value of each run figure; None until known (Gauge.set(None) sets nothing)."""
        self._rank_means: dict[str, list[float]] = {phase: [] for phase in RANK_PHASES}
        self._sums: dict[str, list[float]] = {phase: [] for phase in RANK_PHASES}
        """Per phase, each rank's total over the `_summed` steps since the last publish."""
        self._summed = 0
        self._rank_tags: list[dict[str, str]] = []
        self._published_at: float | None = None

    def step(self, metrics: StepMetrics, rank_records: list[StepRecord], *, recoveries: int,
             checks_passed: int) -> None:
        """Note one finished step; `rank_records[r]` is rank r's record (a partial step's
        records are the survivors' only, with no rank to pin them on: they are left out)."""
        self._figures.update(distrib_step=metrics.step, distrib_step_seconds=metrics.wall_s,
                             distrib_images_per_second=metrics.images_per_s, distrib_loss=metrics.loss,
                             distrib_recoveries=recoveries, distrib_checks_passed=checks_passed)
        if not metrics.partial:
            if len(rank_records) != len(self._sums[PHASES[0]]):  # a size change: start the means afresh
                self._sums, self._summed = {phase: [0.0] * len(rank_records) for phase in RANK_PHASES}, 0
            for phase, sums in self._sums.items():  # 0.2 ms a step at 1000 ranks (aggregate(): 0.7 ms)
                self._sums[phase] = [total + record[phase] for total, record in zip(sums, rank_records)]
            self._summed += 1
        if self._published_at is None or time.monotonic() - self._published_at >= self._interval_s:
            self.flush()

    def evaluation(self, metrics: EvalMetrics) -> None:
        """Publish an evaluation's top-1 at once (one gauge; evaluations are rare)."""
        self._figures["distrib_eval_top1"] = metrics.top1
        self._gauges["distrib_eval_top1"].set(metrics.top1)

    def flush(self, *, recoveries: int | None = None, checks_passed: int | None = None) -> None:
        """Publish the latest figures now, with the counts where given: at the end of a run, so
        its last step shows, and the check after it or a recovery with no step after it."""
        if recoveries is not None:
            self._figures["distrib_recoveries"] = recoveries
        if checks_passed is not None:
            self._figures["distrib_checks_passed"] = checks_passed
        if self._summed:
            self._rank_means = {phase: [total / self._summed for total in sums] for phase, sums in self._sums.items()}
            self._sums = {phase: [0.0] * len(sums) for phase, sums in self._sums.items()}
            self._summed = 0
        for name, value in self._figures.items():
            self._gauges[name].set(value)
        while len(self._rank_tags) < len(self._rank_means[PHASES[0]]):
            self._rank_tags.append({"rank": str(len(self._rank_tags))})
        for phase, gauge in self._rank_gauges.items():
            for mean, tags in zip(self._rank_means[phase], self._rank_tags):
                gauge.set(mean, tags=tags)
        self._published_at = time.monotonic()
