"""Scaling sweeps end to end on local Ray (real actors, real gloo), and sweep-file errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from PIL import Image

from distrib.config import ConfigError
from distrib.scale import load_sweep, run_sweep
from distrib.scale_report import format_table

TINY = """
base: {device: cpu, batch_size_per_worker: 4, image_size: 32, num_classes: 10, loader_workers: 0}
sweep: {num_workers: [1, 2]}
warmup_steps: 1
timed_steps: 2
out_dir: OUT
"""


def sweep_file(tmp_path, text: str = TINY):
    path = tmp_path / "sweep.yaml"
    path.write_text(text.replace("OUT", str(tmp_path / "out")))
    return path


@pytest.mark.usefixtures("ray_local")
def test_tiny_sweep_end_to_end_and_resume(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path))
    said = []
    out_dir, rows = run_sweep(sweep, baseline="torchrun", say=said.append)
    assert len(rows) == 4 and {r["tool"] for r in rows} == {"distrib", "torchrun"}
    for tool in ("distrib", "torchrun"):
        by_workers = {r["num_workers"]: r for r in rows if r["tool"] == tool}
        one, two = by_workers[1], by_workers[2]
        assert one["efficiency"] == pytest.approx(1.0)
        assert two["efficiency"] == pytest.approx(two["images_per_s"] / (2 * one["images_per_s"]))
        assert two["images_per_s"] > 0 and two["torch_version"] and two["ray_version"] and two["device"] == "cpu"
    ours = next(r for r in rows if r["tool"] == "distrib" and r["num_workers"] == 2)
    assert ours["allreduce_bytes"] == 4 * 11_181_642  # every resnet18 (10-class) gradient, fp32
    assert ours["microbench_busbw_gbps"] > 0 and ours["achieved_busbw_gbps"] > 0
    assert ours["exposed_comm_s"] >= 0 and ours["backward_compute_s"] > 0
    parts = sum(ours[k] for k in ("data_s", "forward_s", "backward_s", "optimizer_s"))
    assert ours["step_s"] == pytest.approx(parts + ours["driver_overhead_s"], rel=0.25)

    with (out_dir / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 4 and all(row["images_per_s"] and row["torch_version"] for row in csv_rows)
    assert json.loads((out_dir / "results.json").read_text()) == rows
    for name in ("throughput.png", "efficiency.png", "breakdown.png"):
        with Image.open(out_dir / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300

    # An interrupted sweep: one point's row never got written, its run directory is there. Resuming
    # runs only it, in the same directory. (distrib's 2-worker point: its replicas, kept by this
    # module's keep_warm, start it in a fraction of a second.)
    lines = (out_dir / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["tool"] for line in lines] == ["distrib", "distrib", "torchrun", "torchrun"]
    (out_dir / "results.jsonl").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    said.clear()
    _, resumed = run_sweep(sweep, baseline="torchrun", resume_dir=out_dir, say=said.append)
    assert said[0] == f"resuming {out_dir}: 3 points done, 1 to run"
    assert [text.split(":")[0] for text in said[1:]] == ["point 1/1"]
    assert len(resumed) == 4
    assert sorted(p.name for p in (out_dir / "points").iterdir()) == ["001", "002"]
    assert json.loads((out_dir / "points" / "002" / "summary.json").read_text())["num_workers"] == 2


@pytest.mark.parametrize(("text", "message"), [
    ("base: {}\nsweep: {num_workers: [1]}\nwarmup: 2\n", "sweep warmup: unknown key; did you mean 'warmup_steps'?"),
    ("base: {}\nsweep: {image_size: [64]}\n", "must be a mapping with at least num_workers"),
    ("base: {}\nsweep: {num_workers: [1], lr: [0.1]}\n", "sweep sweep.lr: [0.1] is invalid: cannot be swept"),
    ("base: {}\nsweep: {num_workers: [0, 2]}\n", "sweep sweep.num_workers: 0 is invalid: must be >= 1"),
    ("base: {lr: fast}\nsweep: {num_workers: [1]}\n", "sweep base.lr: 'fast' is invalid: must be a number"),
    ("base: {}\nsweep: {num_workers: [1, 3]}\nscaling: strong\nglobal_batch_size: 64\n",
     "global_batch_size: 64 is invalid: must divide by every num_workers (3)"),
    ("base: {}\nsweep: {num_workers: 2}\n", "must be a non-empty list"),
    ("base: [1]\nsweep: {num_workers: [1]}\n", "sweep base: [1] is invalid"),
    ("base: {eval_every: 5}\nsweep: {num_workers: [1]}\ntarget_top1: '0.5'\n",
     "sweep target_top1: '0.5' is invalid: must be a number"),
    ("base: {}\nsweep: {num_workers: [1]}\nglobal_batch_size: '64'\n", "sweep global_batch_size: '64' is invalid"),
    ("base: {}\nsweep: {num_workers: [1]}\nout_dir: out/{name}\n", "sweep out_dir: 'out/{name}' is invalid"),
    ("base: {}\nsweep: {num_workers: [1]}\nout_dir: out/a{\n", "may hold {time} (the start time) and no other"),
    ("base: {}\nsweep: {num_workers: [1]}\nout_dir: 'out/{time:%Y}'\n", "may hold {time} (the start time)"),
    # Valid for base.steps, not for a throughput point's warmup_steps + timed_steps (13 by default).
    ("base: {steps: 100, warmup_steps: 20}\nsweep: {num_workers: [1, 2]}\n",
     "sweep point num_workers=1: warmup_steps: 20 is invalid: must be >= 0 and shorter than the run (steps=13)"),
    ("base: {steps: 100, lr_schedule: step, lr_milestones: [50]}\nsweep: {num_workers: [1]}\n",
     "sweep point num_workers=1: lr_milestones: [50] is invalid"),
])
def test_bad_sweep_files(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(sweep_file(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_strong_scaling_splits_the_global_batch(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, "base: {}\nsweep: {num_workers: [1, 2, 4]}\nscaling: strong\n"
                                            "global_batch_size: 64\n"))
    assert [(p["num_workers"], p["batch_size_per_worker"]) for p in sweep.points()] == [(1, 64), (2, 32), (4, 16)]


@pytest.fixture
def no_ray(monkeypatch):
    """connect_ray fails the test: the input must be refused before Ray starts (patched rather than
    RAY_ADDRESS=127.0.0.1:9, which a Ray already running in this process would never try)."""
    def connect_ray(address=None):
        raise AssertionError("connect_ray was called before the bad input was found")

    monkeypatch.setattr("distrib.cluster.connect_ray", connect_ray)


@pytest.mark.parametrize(("out_dir", "resume", "message"), [
    ("FILE", None, "out_dir: 'FILE' is invalid: 'FILE' is a file, not a folder; choose another out_dir"),
    ("FILE/out", None, "out_dir: 'FILE/out' is invalid: 'FILE' is a file, not a folder"),
    ("out", "FILE", "--resume 'FILE' is invalid: 'FILE' is a file, not a folder"),
    ("out", "EMPTY", "--resume 'EMPTY' is invalid: no sweep.yaml there"),
])
def test_cli_scale_refuses_an_out_dir_before_ray(tmp_path, capsys, no_ray, out_dir, resume, message):
    from distrib import cli

    (tmp_path / "FILE").write_text("")
    (tmp_path / "EMPTY").mkdir()
    path = sweep_file(tmp_path, f"base: {{}}\nsweep: {{num_workers: [1]}}\nout_dir: {tmp_path / out_dir}\n")
    argv = ["scale", "--config", str(path)] + (["--resume", str(tmp_path / resume)] if resume else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message.replace("FILE", str(tmp_path / "FILE")).replace("EMPTY", str(tmp_path / "EMPTY")) in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("base", "message"), [
    ("{device: cpu}", "num_workers: 64 workers x 1 CPU need 64 CPUs; this machine has"),
    ("{weights: /no/such.pth}", "weights: '/no/such.pth' is invalid: no such file"),
])
def test_cli_scale_checks_every_point_before_ray(tmp_path, capsys, no_ray, base, message):
    """A point that can never run (here the last) is refused before the first runs, and the
    sweep writes nothing."""
    path = sweep_file(tmp_path, f"base: {base}\nsweep: {{num_workers: [1, 64]}}\nout_dir: {tmp_path / 'out'}\n")
    from distrib import cli

    assert cli.main(["scale", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_cli_bad_sweep_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "distrib", "scale", "--config", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no such file" in done.stderr and "Traceback" not in done.stderr


def test_shipped_sweeps_load():
    from pathlib import Path

    shipped = sorted((Path(__file__).resolve().parents[1] / "configs").glob("sweep-*.yaml"))
    assert len(shipped) >= 2
    for path in shipped:
        assert load_sweep(path).points()


@pytest.mark.usefixtures("ray_local")
def test_time_to_accuracy_sweep(tmp_path, digits_folder):
    """A target every point reaches at its first evaluation (chance on 10 classes is ~0.1), and
    one no point reaches within the cap: the mechanics, not the learning, are under test here."""
    base = (f"base: {{device: cpu, data: folder, data_dir: {digits_folder}, num_classes: 10, image_size: 32, "
            "batch_size_per_worker: 8, loader_workers: 0, augment: none, val_fraction: 0.1, eval_every: 2, "
            "steps: 4}\nsweep: {num_workers: [1, 2]}\nout_dir: OUT\n")
    reached = load_sweep(sweep_file(tmp_path, base + "target_top1: 0.01\n"))
    _, rows = run_sweep(reached, say=lambda text: None)
    assert [(r["num_workers"], r["reached_target"], r["steps_to_target"]) for r in rows] == [(1, True, 2), (2, True, 2)]
    assert all(r["images_to_target"] == 2 * 8 * r["num_workers"] and r["seconds_to_target"] > 0 for r in rows)
    missed_text = base.replace("OUT", str(tmp_path / "missed")).replace("[1, 2]", "[2]")
    missed = load_sweep(sweep_file(tmp_path, missed_text + "target_top1: 1.0\n"))
    out_dir, rows = run_sweep(missed, say=lambda text: None)
    assert all(not r["reached_target"] and r["steps_to_target"] is None and 0 <= r["best_top1"] < 1 for r in rows)
    table = format_table(rows)
    assert "to top-1 1: steps" in table and table.count("missed") == 1
    with Image.open(out_dir / "time_to_accuracy.png") as image:
        assert image.format == "PNG"
    with pytest.raises(ConfigError, match="drop --baseline or target_top1"):
        run_sweep(missed, baseline="torchrun")


def test_time_to_accuracy_needs_evaluation(tmp_path):
    with pytest.raises(ConfigError, match="sweep base.eval_every: 0 is invalid"):
        load_sweep(sweep_file(tmp_path, "base: {}\nsweep: {num_workers: [1]}\ntarget_top1: 0.9\n"))
    with pytest.raises(ConfigError, match=r"sweep target_top1: 1.5 is invalid: must be in \(0, 1\]"):
        load_sweep(sweep_file(tmp_path, "base: {eval_every: 5}\nsweep: {num_workers: [1]}\ntarget_top1: 1.5\n"))
