"""`distrib report RUN_DIR [RUN_DIR ...]`: a text summary and PNG plots of runs, several overlaid.

    OUT/loss.png              training loss against step, one line per run
    OUT/top1.png              held-out top-1 against step (when a run has evaluations)
    OUT/lr.png                learning rate against step
    OUT/images_per_s.png      throughput against step
    OUT/phases-NAME.png       one per run: data, forward, backward and optimizer ms per step, stacked
    OUT/stragglers-NAME.png   one per run whose summary.json has "stragglers": each rank's mean phase times

NAME is the run's name with "/" as "_", and -2, -3, ... after it where two runs would share it.

Every plot marks each event in events.jsonl (heal, restart, shrink, grow) with a vertical line at its
step. OUT is RUN_DIR/report for one run, ./report for several. Reads only the files the
driver wrote (see rundir.py), so it works on a run still going or one that was killed:
no torch, no Ray, and matplotlib only once the plots are drawn. A RUN_DIR may be an
object-storage URI (storage.py; metrics as of the driver's last upload), and so may OUT
(the PNGs are drawn in a scratch folder, then uploaded); without --out, a URI's report goes
to ./report. A local OUT gets all the PNGs or, on an error, none of them: they are drawn in a
scratch folder inside OUT and renamed into place only once all are drawn. A run given twice, or
a line of metrics.jsonl or events.jsonl without the step (or the kind) it is placed by, is a
ConfigError.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distrib import storage
from distrib.errors import ConfigError
from distrib.protocol import PHASES


@dataclass(frozen=True)
class Run:
    """One run directory's records."""

    path: Path | storage.RemotePath
    name: str
    """What the plots and the summary call it: the directory's name (its path if names clash)."""
    steps: list[dict]
    """metrics.jsonl's "kind": "step" lines, in step order."""
    evals: list[dict]
    """metrics.jsonl's "kind": "eval" lines."""
    events: list[dict]
    """events.jsonl's lines, one per recovery ([] when there is none)."""
    summary: dict | None
    """summary.json; None when the run has not finished."""


def report(run_dirs: list[str], out: str | None = None) -> tuple[str, list[Path | storage.RemotePath]]:
    """The text summary of `run_dirs` and the PNGs written to `out` (see the module docstring).
    ConfigError, before anything is written, for a directory that holds no run or a damaged
    record or a run given twice, and for a local `out` that cannot be written (then left as it was)."""
    paths = [storage.locate(d, what="RUN_DIR") for d in run_dirs]
    _refuse_repeats(paths)
    runs = [_load(path, name) for path, name in zip(paths, _names(paths))]
    text = "\n".join(format_run(run) for run in runs)
    if out and storage.is_uri(out):  # drawn in a scratch folder, then each PNG uploaded
        storage.check_writable(out, what="--out")
        target, uploaded = storage.locate(out, what="--out"), []
        with tempfile.TemporaryDirectory(prefix="distrib-report-") as scratch:
            for png in write_plots(runs, Path(scratch)):
                storage.write_whole(target / png.name, [png.read_bytes()])
                uploaded.append(target / png.name)
        return text, uploaded
    local = len(paths) == 1 and isinstance(paths[0], Path)
    out_dir = Path(out) if out else (paths[0] / "report" if local else Path("report"))
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is a file; give a folder for the plots")
    return text, _write_plots_whole(runs, out_dir)


def _write_plots_whole(runs: list[Run], out_dir: Path) -> list[Path]:
    """`write_plots` into `out_dir`, all or nothing: drawn in a scratch folder inside it (so each
    move is a rename on one filesystem), then renamed into place. On an error the scratch folder
    goes, and so do the folders made for `out_dir`. ConfigError for an `out_dir` that cannot be
    made or written, or one where a PNG's name is taken by a folder."""
    made = list(itertools.takewhile(lambda p: not p.exists(), (out_dir, *out_dir.parents)))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    except OSError as err:
        raise ConfigError(f"--out {str(out_dir)!r} cannot be written ({err.strerror or err}); "
                          "give a folder you can create and write to") from None
    try:
        drawn = write_plots(runs, scratch)
        for png in drawn:  # checked first, as a rename cannot put a file over a folder
            if (out_dir / png.name).is_dir():
                raise ConfigError(f"--out {str(out_dir)!r} has a folder named {png.name!r}; "
                                  "move it away or give another --out")
        for png in drawn:
            os.replace(png, out_dir / png.name)
    except BaseException:
        shutil.rmtree(made[-1] if made else scratch, ignore_errors=True)
        raise
    scratch.rmdir()  # empty now
    return [out_dir / png.name for png in drawn]


def _refuse_repeats(paths: list[Path | storage.RemotePath]) -> None:
    """ConfigError for a run given twice (also as another path to it, e.g. a symlink). Refused
    rather than drawn twice: its lines would lie on each other under two names, which is a slip
    of the command line (an overlapping glob), never what was asked for."""
    seen: dict[str, Path | storage.RemotePath] = {}
    for path in paths:
        earlier = seen.setdefault(str(path.resolve()), path)
        if earlier is not path:
            raise ConfigError(f"RUN_DIR {str(path)!r} is the same run as {str(earlier)!r}; give each run once")


def _names(paths: list[Path]) -> list[str]:
    names = [p.resolve().name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _load(path: Path, name: str) -> Run:
    if not path.is_dir():
        raise ConfigError(f"run directory {str(path)!r} does not exist")
    if not (path / "metrics.jsonl").is_file():
        raise ConfigError(f"{str(path)!r} has no metrics.jsonl: give a run directory that distrib train wrote")
    records = _read_lines(path / "metrics.jsonl", _metrics_problem)
    events, summary_file = path / "events.jsonl", path / "summary.json"
    try:
        return Run(path=path, name=name,
                   steps=sorted((r for r in records if r.get("kind") == "step"), key=lambda r: r["step"]),
                   evals=[r for r in records if r.get("kind") == "eval"],
                   events=_read_lines(events, _event_problem) if events.exists() else [],
                   summary=_read_summary(summary_file) if summary_file.exists() else None)
    except OSError as err:  # e.g. a folder where the driver writes a file
        raise ConfigError(f"{str(path)!r}: {err.strerror or err} ({err.filename}); "
                          "give a run directory that distrib train wrote") from None


def _read_summary(path: Path) -> dict:
    """summary.json. The driver writes it whole (storage.write_whole), so one that is not a JSON
    object was damaged afterwards: ConfigError, as a guess at the run's figures would mislead."""
    return _json_object(path.read_text(), f"{str(path)!r}",
                        "delete it to report the run as not finished, or restore it from a copy")


def _read_lines(path: Path, problem: Callable[[dict], str | None]) -> list[dict]:
    """The JSON objects of the log at `path`, one a line (all its parts, on object storage). The
    driver ends every line with a newline once written, so text after the last one is a line cut
    short by a killed run: it is left out. A whole line that is not a JSON object, or one where
    `problem` finds something, was never written by the driver, so it is a ConfigError naming the
    file and line, not skipped: the records would be wrong."""
    records = []
    for number, line in enumerate(storage.read_lines(path).split("\n")[:-1], 1):
        if line.strip():
            where = f"{str(path)!r} line {number}"
            record = _json_object(line, where, "fix or delete that line")
            if found := problem(record):
                raise ConfigError(f"{where} {found}; fix or delete that line")
            records.append(record)
    return records


def _metrics_problem(record: dict) -> str | None:
    """What a step or eval line of metrics.jsonl lacks of its step (the lines' order and every
    plot's x); lines of other kinds are not read."""
    return _lacks(record, ("step",)) if record.get("kind") in ("step", "eval") else None


def _event_problem(record: dict) -> str | None:
    """What an events.jsonl line lacks of the fields _describe_event and the plots read."""
    if not isinstance(record.get("event"), str):
        return "has no \"event\" naming its kind (heal, restart, shrink or grow)"
    return _lacks(record, ("step", "from", "to") if record["event"] in ("shrink", "grow") else ("step",))


def _lacks(record: dict, keys: tuple[str, ...]) -> str | None:
    """The first of `keys` that `record` lacks or holds as other than a number, said for a message."""
    for key in keys:
        if key not in record:
            return f"has no {json.dumps(key)}"
        if isinstance(record[key], bool) or not isinstance(record[key], (int, float)):
            return f"has {json.dumps(key)}: {json.dumps(record[key])[:40]}, not a number"
    return None


def _json_object(text: str, where: str, fix: str) -> dict:
    """`text` as a JSON object; ConfigError naming `where` and `fix` for anything else."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where} is not JSON ({err}); {fix}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where} is {text.strip()[:40]!r}, not a JSON object; {fix}")
    return value


# ---- the text summary -------------------------------------------------------------------------
def format_run(run: Run) -> str:
    """A few lines on one run: steps, final loss, images/s, top-1, recoveries, stragglers."""
    if not run.steps:
        return f"{run.name}: no steps recorded yet"
    figures = [f"{len(run.steps)} steps", f"final loss {run.steps[-1]['loss']:.4f}",
               f"{_images_per_s(run):.1f} images/s"]
    if run.evals:
        figures.append(f"top-1 {run.evals[-1]['top1']:.4f} (best {max(e['top1'] for e in run.evals):.4f})")
    if run.summary is None:
        figures.append("not finished (no summary.json)")
    lines = [f"{run.name}: " + ", ".join(figures)]
    if run.events:
        lines.append("  recoveries: " + "; ".join(_describe_event(e) for e in run.events))
    stragglers = (run.summary or {}).get("stragglers")
    if stragglers and stragglers.get("ranks"):
        lines.append(format_stragglers(stragglers))
    return "\n".join(lines)


def _images_per_s(run: Run) -> float:
    """summary.json's figure (warm-up left out as the driver chose) once the run has finished;
    before that, every step but the first over metrics.jsonl."""
    if run.summary and "images_per_s" in run.summary:
        return run.summary["images_per_s"]
    timed = run.steps[1:] or run.steps
    wall_s = sum(s["wall_s"] for s in timed)
    return sum(s["images_per_s"] * s["wall_s"] for s in timed) / wall_s if wall_s > 0 else 0.0


def _describe_event(event: dict) -> str:
    if event["event"] in ("shrink", "grow"):
        return f"{event['event']} from {event['from']} to {event['to']} ranks at step {event['step']}"
    ranks = ", ".join(str(r) for r in event.get("ranks", []))
    text = f"{event['event']} at step {event['step']} (rank {ranks})"
    if "restored_step" in event:
        text += f", back to step {event['restored_step']}"
    return text


def format_stragglers(stragglers: dict) -> str:
    """Each rank's mean time per phase in ms, and over the fastest rank's time for that phase
    ("-" where the fastest took no measurable time); ranks named as stragglers are starred."""
    phases, ranks = stragglers["phases"], stragglers["ranks"]
    fastest = {p: min(r[p] for r in ranks) for p in phases}
    named = set(stragglers.get("named", []))
    lines = ["  per rank: mean ms per step, and its ratio to the fastest rank's; * named a straggler",
             "  rank  " + "".join(f"{p[:-2] + ' ms':>14}{'ratio':>8}" for p in phases)]
    for r in ranks:
        cells = "".join(f"{r[p] * 1e3:14.2f}{_ratio(r[p], fastest[p]):>8}" for p in phases)
        lines.append(f"  {r['rank']:>3}{'*' if r['rank'] in named else ' '}  {cells}")
    return "\n".join(lines)


def _ratio(value: float, fastest: float) -> str:
    return f"{value / fastest:.2f}x" if fastest > 0 else "-"


# ---- the plots ----------------------------------------------------------------------------------
def write_plots(runs: list[Run], out_dir: Path) -> list[Path]:
    """Draw every plot of the module docstring into `out_dir`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
    written = [_plot_steps(runs, out_dir / "loss.png", "loss", "training loss"),
               _plot_steps(runs, out_dir / "lr.png", "lr", "learning rate"),
               _plot_steps(runs, out_dir / "images_per_s.png", "images_per_s", "images/s")]
    if any(run.evals for run in runs):
        written.insert(1, _plot_steps(runs, out_dir / "top1.png", "top1", "held-out top-1", evals=True))
    for run, file_name in zip(runs, _file_names([run.name for run in runs])):
        written.append(_plot_phases(run, out_dir / f"phases-{file_name}.png"))
        stragglers = (run.summary or {}).get("stragglers")
        if stragglers and stragglers.get("ranks"):
            written.append(_plot_stragglers(run.name, stragglers, out_dir / f"stragglers-{file_name}.png"))
    return written


def _file_names(names: list[str]) -> list[str]:
    """`names` fit for file names, all distinct: "/" as "_", and -2, -3, ... after a name taken
    before (distinct paths such as a_b/run and a/b/run both become a_b_run). Compared without
    case, as a case-insensitive filesystem (macOS, Windows) would put Run and run in one file."""
    taken, file_names = set(), []
    for name in names:
        base = candidate = name.replace("/", "_")
        suffix = 1
        while candidate.casefold() in taken:
            suffix += 1
            candidate = f"{base}-{suffix}"
        taken.add(candidate.casefold())
        file_names.append(candidate)
    return file_names


def _plot_steps(runs: list[Run], path: Path, key: str, what: str, *, evals: bool = False) -> Path:
    """`key` of every step (or evaluation) against the step, one line per run."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        rows = run.evals if evals else run.steps
        line, = ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=run.name,
                        marker="o" if evals else None, markersize=4)
        _mark_recoveries(ax, run.events, line.get_color())
    ax.set(xlabel="step", ylabel=what, title=f"{what} per step")
    ax.legend(fontsize=7)
    return _save(fig, ax, path)


def _plot_phases(run: Run, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.stackplot([s["step"] for s in run.steps], *[[1e3 * s[p] for s in run.steps] for p in PHASES],
                 labels=[p[:-2] for p in PHASES])
    _mark_recoveries(ax, run.events, "black")
    # backward includes the all-reduce it overlaps; the driver's own time is left out
    ax.set(xlabel="step", ylabel="ms (mean over ranks)", title=f"Where each step's time goes: {run.name}")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, ax, path)


def _plot_stragglers(name: str, stragglers: dict, path: Path) -> Path:
    """One group of bars per phase, one bar per rank: a slow rank stands out within its group."""
    import matplotlib.pyplot as plt

    phases, ranks = stragglers["phases"], stragglers["ranks"]
    named = set(stragglers.get("named", []))
    width = 0.8 / len(ranks)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(phases) + 0.3 * len(ranks) * len(phases)), 4.5))
    for i, r in enumerate(ranks):
        label = f"rank {r['rank']}" + (" (straggler)" if r["rank"] in named else "")
        ax.bar([j + (i - (len(ranks) - 1) / 2) * width for j in range(len(phases))], [1e3 * r[p] for p in phases],
               width, label=label, hatch="//" if r["rank"] in named else None)
    ax.set_xticks(range(len(phases)), [p[:-2] for p in phases])
    ax.set(ylabel="mean ms per step", title=f"Phase times per rank: {name}")
    ax.legend(fontsize=7)
    return _save(fig, ax, path)


def _mark_recoveries(ax, events: list[dict], color) -> None:
    """A dashed vertical line at each recovery's step, labelled with its kind at the top."""
    for event in events:
        ax.axvline(event["step"], color=color, linestyle="--", linewidth=1, alpha=0.7)
        ax.text(event["step"], 0.98, f" {event['event']}", transform=ax.get_xaxis_transform(), rotation=90,
                va="top", ha="right", fontsize=7, color=color)


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
