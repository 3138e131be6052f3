"""What `distrib scale` writes once its points are measured: efficiency, CSV, JSON, plots, a table.

    OUT_DIR/results.csv     one row per point (the columns below)
    OUT_DIR/results.json    the same rows, every field
    OUT_DIR/throughput.png  images/s against workers, with the ideal line from 1 worker
    OUT_DIR/efficiency.png  images/s / (N x images/s of the 1-worker point of the same series)
    OUT_DIR/breakdown.png   where a distrib step's time goes, stacked, per point (throughput sweeps)
    OUT_DIR/time_to_accuracy.png  seconds to the target top-1 against workers, beside images/s
                                  (time-to-accuracy sweeps: statistical next to hardware efficiency)

Rows are plain dicts (as `scale.run_sweep` appends them to results.jsonl), so a report
can be rebuilt from that file alone.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

_SERIES_KEYS = ("tool", "image_size", "batchnorm", "precision", "bucket_cap_mb", "grad_compression",
                "placement_strategy")


def series_key(row: dict, scaling: str) -> tuple:
    """Rows of one line in the plots: everything but the worker count (and, under weak scaling,
    with the per-worker batch fixed; under strong scaling, with the global batch fixed)."""
    batch = row["global_batch_size"] if scaling == "strong" else row["batch_size_per_worker"]
    return tuple(row.get(k) for k in _SERIES_KEYS) + (batch,)


def add_efficiency(rows: list[dict], scaling: str) -> list[dict]:
    """efficiency = images/s / (num_workers x images/s of the 1-worker point of the same series)."""
    single = {series_key(r, scaling): r["images_per_s"] for r in rows if r["num_workers"] == 1}
    for row in rows:
        one = single.get(series_key(row, scaling))
        row["efficiency"] = row["images_per_s"] / (row["num_workers"] * one) if one else None
    return rows


_CSV_COLUMNS = ("tool", "num_workers", "batch_size_per_worker", "global_batch_size", "image_size", "batchnorm",
                "precision",
                "bucket_cap_mb", "grad_compression", "placement_strategy", "scaling", "images_per_s", "efficiency",
                "step_s", "data_s", "forward_s", "backward_s", "backward_compute_s", "exposed_comm_s", "optimizer_s",
                "driver_overhead_s", "comm_s", "allreduce_bytes", "achieved_busbw_gbps", "microbench_allreduce_s",
                "microbench_busbw_gbps", "device", "device_name", "backend", "torch_version", "ray_version",
                "warmup_steps", "timed_steps", "target_top1", "reached_target", "best_top1", "steps_to_target",
                "images_to_target", "seconds_to_target", "point_id")


def write_outputs(out_dir: Path, rows: list[dict]) -> None:
    """results.csv, results.json and the three plots in `out_dir`."""
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
    scaling = rows[0]["scaling"] if rows else "weak"
    series: dict[tuple, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["num_workers"]):
        series.setdefault(series_key(row, scaling), []).append(row)
    worker_ticks = sorted({r["num_workers"] for r in rows})
    _plot_throughput(out_dir / "throughput.png", series, scaling, worker_ticks)
    _plot_efficiency(out_dir / "efficiency.png", series, scaling, worker_ticks)
    if any(r.get("target_top1") for r in rows):
        _plot_time_to_accuracy(out_dir / "time_to_accuracy.png", series, scaling, worker_ticks)
    else:
        _plot_breakdown(out_dir / "breakdown.png", [r for r in rows if r["tool"] == "distrib"])


def _label(rows_of_series: list[dict], scaling: str) -> str:
    r = rows_of_series[0]
    if scaling == "strong":
        batch = f"global batch {r['global_batch_size']}"
    else:
        batch = f"batch {r['batch_size_per_worker']}/worker"
    extra = ("" if r["tool"] != "distrib"
             else f", {r['precision']}, {r['grad_compression']} compression, batchnorm {r.get('batchnorm', 'train')}")
    return f"{r['tool']}: {r['image_size']} px, {batch}{extra}"


def _save_line_plot(fig, axes, path: Path, worker_ticks: list[int]) -> None:
    """Worker ticks, legend and grid on each of `axes` (one or several), then the PNG."""
    import matplotlib.pyplot as plt

    for ax in axes if isinstance(axes, tuple) else (axes,):
        ax.set_xticks(worker_ticks)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_throughput(path: Path, series: dict[tuple, list[dict]], scaling: str, worker_ticks: list[int]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rs in series.values():
        workers = [r["num_workers"] for r in rs]
        line, = ax.plot(workers, [r["images_per_s"] for r in rs], marker="o", label=_label(rs, scaling))
        ones = [r for r in rs if r["num_workers"] == 1]
        if ones:
            ax.plot(workers, [w * ones[0]["images_per_s"] for w in workers], linestyle="--",
                    color=line.get_color(), alpha=0.5, label="ideal (linear from 1 worker)")
    ax.set(xlabel="workers", ylabel="images/s", title=f"Throughput ({scaling} scaling)")
    _save_line_plot(fig, ax, path, worker_ticks)


def _plot_efficiency(path: Path, series: dict[tuple, list[dict]], scaling: str, worker_ticks: list[int]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rs in series.values():
        with_eff = [r for r in rs if r.get("efficiency") is not None]
        ax.plot([r["num_workers"] for r in with_eff], [r["efficiency"] for r in with_eff], marker="o",
                label=_label(rs, scaling))
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="workers", ylabel="efficiency (images/s / (N x 1-worker images/s))",
           title="Scaling efficiency", ylim=(0, 1.2))
    _save_line_plot(fig, ax, path, worker_ticks)


def _plot_time_to_accuracy(path: Path, series: dict[tuple, list[dict]], scaling: str,
                           worker_ticks: list[int]) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for rs in series.values():
        reached = [r for r in rs if r["reached_target"]]
        left.plot([r["num_workers"] for r in reached], [r["seconds_to_target"] for r in reached], marker="o",
                  label=_label(rs, scaling))
        right.plot([r["num_workers"] for r in rs], [r["images_per_s"] for r in rs], marker="o",
                   label=_label(rs, scaling))
    target = next(r["target_top1"] for rs in series.values() for r in rs)
    left.set(xlabel="workers", ylabel="seconds", title=f"Time to top-1 {target:g} (points that missed it left out)")
    right.set(xlabel="workers", ylabel="images/s", title="Throughput")
    _save_line_plot(fig, (left, right), path, worker_ticks)


_BREAKDOWN_PARTS = (("data_s", "data"), ("forward_s", "forward"), ("backward_compute_s", "backward compute"),
                    ("exposed_comm_s", "exposed all-reduce"), ("optimizer_s", "optimizer"),
                    ("driver_overhead_s", "driver"))


def _plot_breakdown(path: Path, ours: list[dict]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ours) + 2), 4.5))
    names = [f"{r['num_workers']}w {r['image_size']}px b{r['batch_size_per_worker']}" for r in ours]
    bottom = [0.0] * len(ours)
    for key, text in _BREAKDOWN_PARTS:
        # backward_s = backward compute + exposed all-reduce; clamp so the stack adds up to the step
        heights = [1e3 * (min(r[key], r["backward_s"]) if key == "backward_compute_s" else r[key]) for r in ours]
        ax.bar(names, heights, bottom=bottom, label=text)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set(ylabel="ms per step", title="Where a step's time goes (distrib)")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    """The sweep as a Markdown table: one line per point ("-" where a tool does not measure it)."""
    def value(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
        return format(row[key] * scale, fmt) if row.get(key) is not None else "-"

    if any(r.get("target_top1") for r in rows):
        return _format_time_to_accuracy(rows)
    lines = ["| tool | workers | batch/worker | px | batchnorm | images/s | efficiency | step ms "
             "| exposed all-reduce ms | busbw achieved / microbench GB/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["tool"] != "distrib", r["tool"], r["image_size"], r["num_workers"])):
        lines.append(f"| {r['tool']} | {r['num_workers']} | {r['batch_size_per_worker']} | {r['image_size']} | "
                     f"{r.get('batchnorm', '-')} | {r['images_per_s']:.1f} | {value(r, 'efficiency', '.3f')} | "
                     f"{value(r, 'step_s', '.1f', 1e3)} | "
                     f"{value(r, 'exposed_comm_s', '.1f', 1e3)} | {value(r, 'achieved_busbw_gbps', '.2f')} / "
                     f"{value(r, 'microbench_busbw_gbps', '.2f')} |")
    return "\n".join(lines)


def _format_time_to_accuracy(rows: list[dict]) -> str:
    target = rows[0]["target_top1"]
    lines = [f"| workers | batch/worker | px | images/s | efficiency | to top-1 {target:g}: steps | images | seconds "
             "| best top-1 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["image_size"], r["batch_size_per_worker"], r["num_workers"])):
        reached = (f"{r['steps_to_target']} | {r['images_to_target']} | {r['seconds_to_target']:.1f}"
                   if r["reached_target"] else "missed | - | -")
        efficiency = f"{r['efficiency']:.3f}" if r.get("efficiency") is not None else "-"
        lines.append(f"| {r['num_workers']} | {r['batch_size_per_worker']} | {r['image_size']} | "
                     f"{r['images_per_s']:.1f} | {efficiency} | {reached} | {r['best_top1']:.4f} |")
    return "\n".join(lines)
