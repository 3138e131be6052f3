"""The run's figures on Ray's own metrics endpoint: published from this (driver) process through
ray.util.metrics, scraped from the local Ray node and read with prometheus_client's parser."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from distrib.metrics import EvalMetrics, aggregate
from distrib.prom import METRIC_NAMES, RANK_FIGURES, RunGauges, default_publish_interval_s

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana-distrib.json"


@pytest.fixture(scope="module")
def metrics_url():
    """Our own local Ray (address="local": not a cluster another test started), exporting every
    second (the default is every 10 s); yields its node's metrics endpoint."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        node = ray.nodes()[0]
        yield f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    finally:
        ray.shutdown()


def scrape(url: str, run: str) -> dict:
    """{(metric name, rank or None): value} of one run's distrib metrics as the endpoint shows them."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(sample.name, sample.labels.get("rank")): sample.value
            for family in text_string_to_metric_families(text) if family.name.startswith("ray_distrib_")
            for sample in family.samples if sample.labels.get("run") == run}


def wait_for(url: str, run: str, want: dict, timeout_s: float = 15.0) -> dict:
    """Scrape until the run's metrics include `want` (Ray exports every second here), then return them.
    Under 20 s: Ray's agent drops a gauge not set for that long, and a failure should show the values."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = scrape(url, run)
        if all(got.get(key) == value for key, value in want.items()) or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def record(step: int, rank: int) -> dict:
    """A StepRecord whose times are exact in binary, so their means are exact too."""
    scale = (rank + 1) * step
    return {"step": step, "loss": 2.0 + rank / 4, "data_s": 0.125 * scale, "forward_s": 0.25 * scale,
            "backward_s": 0.5 * scale, "optimizer_s": 0.0625 * scale, "comm_s": 0.375 * scale}


def step_metrics(step: int, records: list[dict], *, partial: bool = False):
    return aggregate(step=step, rank_records=records, loss_kind="cross_entropy", global_batch_size=8,
                     wall_s=0.25 * (step + 1), finished_at=time.time(), lr=0.05, partial=partial)


def published(step: int, *, recoveries: int, checks: int, rank_times: list[dict]) -> dict:
    """What the endpoint should show after `step`, with these per-rank phase times."""
    want = {("ray_distrib_step", None): step, ("ray_distrib_step_seconds", None): 0.25 * (step + 1),
            ("ray_distrib_images_per_second", None): 8 / (0.25 * (step + 1)), ("ray_distrib_loss", None): 2.125,
            ("ray_distrib_recoveries", None): recoveries, ("ray_distrib_checks_passed", None): checks}
    for name, phase in RANK_FIGURES.items():
        want |= {(f"ray_{name}", str(rank)): times[phase] for rank, times in enumerate(rank_times)}
    return want


def test_driver_gauges_reach_rays_endpoint_throttled_with_run_and_rank_labels(metrics_url):
    assert default_publish_interval_s() == 0.5  # half the fixture's 1 s export interval
    gauges = RunGauges("unit-run", publish_interval_s=3600)  # only the first step and flush() publish
    gauges.step(step_metrics(0, [record(0, 0), record(0, 1)]), [record(0, 0), record(0, 1)], recoveries=0,
                checks_passed=1)
    first = published(0, recoveries=0, checks=1, rank_times=[record(0, 0), record(0, 1)])
    assert wait_for(metrics_url, "unit-run", first) == first

    # Throttled: steps 1-3 wait for flush(). Step 2 is partial (one survivor's record, rank unknown),
    # so each rank's phase times are the mean over steps 1 and 3: exactly those of record(2, rank).
    for step in (1, 2, 3):
        records = [record(step, 0)] if step == 2 else [record(step, 0), record(step, 1)]
        gauges.step(step_metrics(step, records, partial=step == 2), records, recoveries=1, checks_passed=2)
    time.sleep(2.5)  # two export intervals: nothing new may show before flush()
    assert scrape(metrics_url, "unit-run") == first
    gauges.evaluation(EvalMetrics(step=3, finished_at=time.time(), count=100, loss=1.5, top1=0.75, top5=0.875,
                                  eval_s=0.5))
    gauges.flush(checks_passed=3)  # the check after the last step
    last = published(3, recoveries=1, checks=3, rank_times=[record(2, 0), record(2, 1)])
    last[("ray_distrib_eval_top1", None)] = 0.75
    assert wait_for(metrics_url, "unit-run", last) == last


def test_training_run_publishes_its_figures(metrics_url, tmp_path):
    from distrib.config import RunConfig
    from distrib.driver import Orchestrator

    cfg = RunConfig(num_workers=2, device="cpu", batch_size_per_worker=4, image_size=32, num_classes=10, steps=4,
                    check_every=2, loader_workers=0, run_dir=str(tmp_path / "run"))
    with Orchestrator(cfg, progress=False) as orch:
        orch.train()
        run = orch.run_dir.name  # the run's name as the driver labels it
        want = {("ray_distrib_step", None): 3, ("ray_distrib_loss", None): orch.history[-1].loss,
                ("ray_distrib_recoveries", None): 0, ("ray_distrib_checks_passed", None): orch.checks_passed}
    got = wait_for(metrics_url, run, want)
    assert {key: got.get(key) for key in want} == want
    assert {(name, rank) for name, rank in got if rank is not None} == \
        {(f"ray_{name}", rank) for name in RANK_FIGURES for rank in ("0", "1")}
    assert all(value >= 0 for (name, rank), value in got.items() if rank is not None)


def test_dashboard_queries_only_what_run_gauges_publish():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "label_values(ray_distrib_step, run)" in variables["run"]["query"]["query"]
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert all('run=~"$run"' in expr for expr in exprs)
    queried = {name for text in (*exprs, variables["run"]["query"]["query"])
               for name in re.findall(r"\bray_(distrib_\w+)", text)}
    assert queried == set(METRIC_NAMES)  # each panel's metric is published, and each published one has a panel
