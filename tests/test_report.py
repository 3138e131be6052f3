"""`distrib report` on run directories written by hand in the driver's formats (no Ray needed):
the text summary's figures, the stragglers table's ratios, valid PNGs, several runs, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

GLOBAL_BATCH = 8


def _step(step: int, *, loss: float, wall_s: float, data_s: float = 0.002) -> dict:
    """One metrics.jsonl step line, as StepMetrics writes it."""
    return {"kind": "step", "step": step, "finished_at": 1795818847.0 + step, "loss": loss, "lr": 0.01 * (1 + step),
            "images_per_s": GLOBAL_BATCH / wall_s, "wall_s": wall_s, "step_s": wall_s - 0.01, "data_s": data_s,
            "forward_s": 0.03, "backward_s": 0.18, "optimizer_s": 0.025, "comm_s": 0.1, "partial": False}


def _eval(step: int, top1: float) -> dict:
    return {"kind": "eval", "step": step, "finished_at": 1795818850.0 + step, "count": 1024, "loss": 2.0,
            "top1": top1, "top5": 0.9, "eval_s": 2.5}


def _write_run(path: Path, lines: list[dict], *, events: list[dict] = (), summary: dict | None = None,
               cut_short: str = "") -> Path:
    """A run directory; `cut_short` is the start of a line a killed driver did not finish."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("num_workers: 2\nbatch_size_per_worker: 4\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + cut_short)
    if events:
        (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return path


def _report(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distrib", "report", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _written(stdout: str) -> list[Path]:
    return [Path(line.removeprefix("wrote ")) for line in stdout.splitlines() if line.startswith("wrote ")]


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100, (path, pixels.shape)


def _heal_run(path: Path) -> Path:
    """12 steps, a heal at step 7, evaluations after steps 5 and 11, a summary with stragglers:
    rank 1 loads its batches twice as slowly as rank 0 and is named."""
    losses = [2.6, 2.5, 2.45, 2.4, 2.3, 2.25, 2.2, 2.15, 2.1, 2.05, 2.0, 1.9876]
    ranks = [{"rank": 0, "data_s": 0.002, "forward_s": 0.030, "backward_s": 0.180, "optimizer_s": 0.025},
             {"rank": 1, "data_s": 0.004, "forward_s": 0.024, "backward_s": 0.180, "optimizer_s": 0.030}]
    stragglers = {"phases": ["data_s", "forward_s", "backward_s", "optimizer_s"],
                  "lead_phases": ["data_s", "forward_s"], "ranks": ranks, "named": [1]}
    heal = {"event": "heal", "recovery": 1, "ranks": [1], "step": 7, "cause": "rank 1 died during step 7",
            "nodes": ["192.0.2.2"], "detected_at": 1795818854.0, "detect_s": 0.03, "replaced": {"1": "fresh"},
            "drop_s": 0.09, "replace_s": 2.6, "state_s": 0.001, "group_s": 0.17, "check_s": 0.08,
            "healed_at": 1795818857.0, "steps_redone": 0, "first_step_s": 3.1}
    summary = {"steps": 12, "timed_steps": 11, "final_loss": losses[-1], "images_per_s": 31.25, "restarts": 1,
               "recoveries": [{"event": "heal", "ranks": [1], "step": 7}], "stragglers": stragglers}
    lines = [_step(s, loss=loss, wall_s=0.25) for s, loss in enumerate(losses)]
    lines[6:6] = [_eval(5, 0.5)]
    lines.append(_eval(11, 0.4375))
    return _write_run(path, lines, events=[heal], summary=summary)


def test_one_run_summary_stragglers_and_plots(tmp_path):
    run = _heal_run(tmp_path / "run1")
    result = _report(str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "run1: 12 steps, final loss 1.9876, 31.2 images/s, top-1 0.4375 (best 0.5000)" in out
    assert "recoveries: heal at step 7 (rank 1)" in out
    assert "not finished" not in out

    # per rank, each phase in ms and over the fastest rank's time for that phase
    rows = {int(m.group(1)): (m.group(2), m.group(3).split())
            for m in re.finditer(r"^\s+(\d+)(\*?)\s+(.*x)$", out, re.MULTILINE)}
    assert rows[0] == ("", ["2.00", "1.00x", "30.00", "1.25x", "180.00", "1.00x", "25.00", "1.00x"])
    assert rows[1] == ("*", ["4.00", "2.00x", "24.00", "1.00x", "180.00", "1.00x", "30.00", "1.20x"])

    written = _written(out)
    assert sorted(p.name for p in written) == ["images_per_s.png", "loss.png", "lr.png", "phases-run1.png",
                                               "stragglers-run1.png", "top1.png"]
    for path in written:
        assert path.parent == run / "report"  # the default for one run
        _assert_png(path)


def test_two_runs_overlaid_with_an_unfinished_one(tmp_path):
    first = _heal_run(tmp_path / "a" / "heal")
    # killed after step 5 while writing step 6 (no summary.json); a restart at step 4 went back to step 2
    walls = [0.5, 0.2, 0.3, 0.25, 0.25, 0.2]
    restart = {"event": "restart", "recovery": 1, "ranks": [0], "step": 4, "cause": "rank 0 died during step 4",
               "detected_at": 1795818860.0, "restored_step": 2, "rebuild_s": 4.2, "steps_redone": 2}
    steps = [_step(s, loss=3.0 - 0.1 * s, wall_s=w) for s, w in enumerate(walls)]
    second = _write_run(tmp_path / "b" / "restart", steps, events=[restart],
                        cut_short='{"kind": "step", "step": 6, "finished_at": 17958')
    result = _report(str(first), str(second), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "heal: 12 steps, final loss 1.9876" in out
    # every step but the first: 5 global batches of 8 images over 1.2 s
    assert "restart: 6 steps, final loss 2.5000, 33.3 images/s, not finished (no summary.json)" in out
    assert "recoveries: restart at step 4 (rank 0), back to step 2" in out
    assert out.count("optimizer ms") == 1  # one stragglers table: the unfinished run has none
    written = _written(out)
    assert sorted(p.name for p in written) == ["images_per_s.png", "loss.png", "lr.png", "phases-heal.png",
                                               "phases-restart.png", "stragglers-heal.png", "top1.png"]
    for path in written:
        assert path.parent == Path("report")  # the default for several runs: ./report
        _assert_png(tmp_path / path)


def test_out_folder_and_clashing_names(tmp_path):
    first = _heal_run(tmp_path / "a" / "run")
    second = _heal_run(tmp_path / "b" / "run")
    result = _report(str(first), str(second), "--out", str(tmp_path / "plots"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{first}: 12 steps" in result.stdout and f"{second}: 12 steps" in result.stdout
    phases = sorted(p.name for p in (tmp_path / "plots").glob("phases-*.png"))
    assert len(phases) == 2 and phases[0] != phases[1]


def test_runs_whose_names_make_one_file_name_get_one_file_each(tmp_path):
    """a_b/run and a/b/run are named by their paths (their names clash), and "/" as "_" makes
    both paths one file name: the second run's plots get -2 rather than a crash on the rename."""
    first = _heal_run(tmp_path / "c" / "a_b" / "run")
    second = _heal_run(tmp_path / "c" / "a" / "b" / "run")
    result = _report(str(first), str(second), "--out", str(tmp_path / "plots"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{first}: 12 steps" in result.stdout and f"{second}: 12 steps" in result.stdout
    name = str(first).replace("/", "_")
    written = _written(result.stdout)
    assert sorted(p.name for p in written if p.name.startswith(("phases-", "stragglers-"))) == [
        f"phases-{name}-2.png", f"phases-{name}.png", f"stragglers-{name}-2.png", f"stragglers-{name}.png"]
    for path in written:
        _assert_png(path)


def test_file_names_are_distinct_also_without_case():
    from distrib.report import _file_names

    assert _file_names(["a/b", "a_b", "A_B", "a_b-2", "Run", "run"]) == [
        "a_b", "a_b-2", "A_B-3", "a_b-2-2", "Run", "run-2"]


def test_the_same_run_given_twice_is_a_one_line_error(tmp_path):
    run = _heal_run(tmp_path / "run")
    for again in ("run", str(run)):  # the same path, or another path to the same run
        result = _report("run", again, "--out", "plots", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"distrib: error: RUN_DIR {again!r} is the same run as 'run'; give each run once"]
        assert not (tmp_path / "plots").exists()


def test_bad_run_dirs_are_one_line_errors(tmp_path):
    missing = tmp_path / "no-such-run"
    result = _report(str(missing), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"distrib: error: run directory {str(missing)!r} does not exist"]

    empty = tmp_path / "empty"
    empty.mkdir()
    result = _report(str(_heal_run(tmp_path / "good")), str(empty), cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "has no metrics.jsonl" in result.stderr
    assert not (tmp_path / "report").exists()  # nothing written before every run was read

    (tmp_path / "a-file").write_text("")
    result = _report(str(tmp_path / "good"), "--out", str(tmp_path / "a-file"), cwd=tmp_path)
    assert result.returncode == 2 and "is a file" in result.stderr


def test_out_that_cannot_be_made_is_a_one_line_error(tmp_path):
    run = _heal_run(tmp_path / "run")
    (tmp_path / "a-file").write_text("")
    result = _report(str(run), "--out", str(tmp_path / "a-file" / "sub"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"distrib: error: --out {str(tmp_path / 'a-file' / 'sub')!r} cannot be written (Not a directory); "
        "give a folder you can create and write to"]


def test_a_folder_in_the_way_leaves_out_as_it_was(tmp_path):
    run = _heal_run(tmp_path / "run")
    out = tmp_path / "plots"
    (out / "lr.png").mkdir(parents=True)
    (out / "loss.png").write_bytes(b"an older report's")
    result = _report(str(run), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"distrib: error: --out {str(out)!r} has a folder named 'lr.png'; move it away or give another --out"]
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "lr.png"]  # no scratch folder left
    assert (out / "loss.png").read_bytes() == b"an older report's"


def test_an_error_while_drawing_removes_the_folders_it_made(tmp_path, monkeypatch):
    from distrib import report

    def draw_one_then_fail(runs, out_dir):
        (out_dir / "loss.png").write_bytes(b"half a report")
        raise OSError("No space left on device")

    monkeypatch.setattr(report, "write_plots", draw_one_then_fail)
    run = _heal_run(tmp_path / "run")
    with pytest.raises(OSError, match="No space left"):
        report.report([str(run)], str(tmp_path / "new" / "plots"))
    assert not (tmp_path / "new").exists()


def test_damaged_records_are_one_line_errors(tmp_path):
    run = _heal_run(tmp_path / "cut")
    summary = run / "summary.json"
    summary.write_text(summary.read_text()[:50])  # not the driver's: it writes summary.json whole
    result = _report(str(run), cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{str(summary)!r} is not JSON" in result.stderr and "delete it" in result.stderr

    steps = [_step(s, loss=2.0, wall_s=0.25) for s in range(3)]
    run = _write_run(tmp_path / "five", steps, cut_short="5\n")  # a whole line, so not skipped as cut short
    result = _report(str(run), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"distrib: error: {str(run / 'metrics.jsonl')!r} line 4 is '5', not a JSON object; fix or delete that line"]
    assert not (run / "report").exists()


@pytest.mark.parametrize(("log", "line", "problem"), [
    ("metrics.jsonl", {"kind": "step"}, 'has no "step"'),
    ("metrics.jsonl", {"kind": "eval", "top1": 0.5}, 'has no "step"'),
    ("metrics.jsonl", {"kind": "step", "step": "3"}, 'has "step": "3", not a number'),
    ("events.jsonl", {"event": "heal"}, 'has no "step"'),
    ("events.jsonl", {"event": "shrink", "step": 2, "to": 1}, 'has no "from"'),
    ("events.jsonl", {"step": 2}, 'has no "event" naming its kind (heal, restart, shrink or grow)'),
])
def test_a_line_without_its_step_or_kind_is_a_one_line_error(tmp_path, log, line, problem):
    steps = [_step(s, loss=2.0, wall_s=0.25) for s in range(3)]
    heal = {"event": "heal", "ranks": [1], "step": 1}
    if log == "metrics.jsonl":
        run, number = _write_run(tmp_path / "run", [*steps, line], events=[heal]), 4
    else:
        run, number = _write_run(tmp_path / "run", steps, events=[heal, line]), 2
    result = _report(str(run), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"distrib: error: {str(run / log)!r} line {number} {problem}; fix or delete that line"]
    assert not (run / "report").exists()


def test_a_folder_where_a_log_belongs_is_a_one_line_error(tmp_path):
    run = _write_run(tmp_path / "run", [_step(s, loss=2.0, wall_s=0.25) for s in range(3)])
    (run / "events.jsonl").mkdir()
    result = _report(str(run), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"distrib: error: {str(run)!r}: Is a directory ({run / 'events.jsonl'}); "
        "give a run directory that distrib train wrote"]
