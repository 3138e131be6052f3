"""`distrib train | scale | seed-step | check | export | evaluate | report | simulate`: the command line,
over the Python API.

Exit codes: 0 done; 1 the run failed (a replica died, hung or diverged); 2 bad
input (the message names the key, the value and the fix); 143 stopped by SIGTERM and
130 by SIGINT (Ctrl-C), in both cases with a checkpoint at the step reached unless a
second signal or stop_grace_s cut the stop short.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import yaml

from distrib import config, preflight, storage
from distrib.errors import (
    CheckpointError,
    ConfigError,
    DivergenceError,
    PlacementError,
    ReplicaError,
    StoppedAtOnce,
    WriteError,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrib", description="Synchronized data-parallel resnet18 training on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_config_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", help="run config YAML (default: the built-in local defaults)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override one config key; repeatable, e.g. --set steps=10 --set lr=0.1")

    train = commands.add_parser("train", help="run a training job")
    add_config_args(train)
    train.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue RUN_DIR from its newest valid checkpoint (with its config.yaml and --set)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar or summary on stderr")

    seed = commands.add_parser("seed-step", help="the tutorial's step through distrib vs a plain script")
    seed.add_argument("--seed", type=int, default=0)
    seed.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    seed.add_argument("--weights", default="none", help="none | DEFAULT | a .pth file")
    seed.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)")

    scale = commands.add_parser("scale", help="run a scaling sweep (throughput, efficiency, time breakdown)")
    scale.add_argument("--config", required=True, help="sweep YAML: base run config and values to sweep")
    scale.add_argument("--baseline", choices=["torchrun"],
                       help="also run each point with plain torchrun + DDP, locally")
    scale.add_argument("--resume", metavar="OUT_DIR", help="continue a sweep, skipping its finished points")
    scale.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)")

    check = commands.add_parser("check", help="validate a config and print it with defaults filled in")
    add_config_args(check)

    export = commands.add_parser("export", help="write a run's newest weights as a plain torchvision resnet18")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--out", help="where to write the state_dict (default RUN_DIR/model.pth); "
                                      "its metadata goes beside it, ending in .json")

    evaluate = commands.add_parser("evaluate", help="loss, top-1 and top-5 of a model on an ImageFolder")
    evaluate.add_argument("model", metavar="RUN_DIR_OR_MODEL", help="a run directory, or a .pth from export")
    evaluate.add_argument("--data", required=True, help="ImageFolder root with the model's classes")
    evaluate.add_argument("--batch-size", type=int, default=64)

    simulate = commands.add_parser("simulate", help="the driver's cost per step, against replicas whose step sleeps")
    simulate.add_argument("--workers", type=int, help="simulated replicas (or --sweep)")
    simulate.add_argument("--sweep", help="comma-separated replica counts, e.g. 2,4,8,16,32,64,128: "
                                          "a table, a fit and a plot")
    simulate.add_argument("--step-ms", type=float, required=True, help="each simulated step's sleep")
    simulate.add_argument("--steps", type=int, default=200)
    simulate.add_argument("--steps-per-call", default="1", help="K; a sweep takes several, e.g. 1,4")
    simulate.add_argument("--calls-in-flight", type=int, default=1, help="default 1: nothing hides the driver")
    simulate.add_argument("--check-every", type=int, default=10)
    simulate.add_argument("--out", default="runs/simulate", help="where a sweep writes points.json, driver_cost.png")
    simulate.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)")

    report = commands.add_parser("report", help="plots and a text summary of one run, or several overlaid")
    report.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    report.add_argument("--out", help="folder for the PNGs (default RUN_DIR/report for one run, ./report for several)")
    return parser


class _StopSignals:
    """SIGTERM and SIGINT during `distrib train` go to Orchestrator.request_stop: the first
    stops at the next step boundary with a checkpoint; a second one, or one before training
    began, stops at once. Installed after Ray's start-up, so Ray's own handler (whose crash
    dump would reach the terminal) no longer sees an orderly SIGTERM."""

    def __init__(self):
        self.orch = None
        self.graceful = False
        """Whether a signal asked for a graceful stop (so a StoppedAtOnce came from a second one)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.orch is None:  # no Ray call in flight yet: raising here is safe
            raise StoppedAtOnce(name)
        if not self.orch.request_stop(name):
            return
        self.graceful = True
        # os.write, not print: a handler that prints while the bar is printing gets a reentrant-call error
        os.write(sys.stderr.fileno(), f"distrib: {name}: stopping at the next step boundary with a checkpoint; "
                                      "send it again to stop at once\n".encode())


def _exit_code(signal_name: str) -> int:
    return 128 + signal.Signals[signal_name].value


def _starts_local_ray(args: argparse.Namespace) -> bool:
    """Whether the command will start a local Ray instance (no --address, no RAY_ADDRESS),
    whose resources are this machine's: what preflight.check(local=True) checks against."""
    return not (args.address or os.environ.get("RAY_ADDRESS"))


def _train(args: argparse.Namespace) -> int:
    from distrib.cluster import connect_ray
    from distrib.driver import Orchestrator

    if args.resume:
        if args.config:
            raise ConfigError("--config and --resume: pick one; a resumed run uses RUN_DIR/config.yaml (and --set)")
        storage.check_writable(args.resume, what="--resume")
        saved = storage.locate(args.resume, what="--resume") / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume!r} is invalid: no config.yaml there; give a run directory")
        if any(pair.split("=", 1)[0].strip() == "run_dir" for pair in args.overrides):
            raise ConfigError("--set run_dir with --resume: a resumed run stays in the directory it resumes; "
                              "copy the run directory elsewhere and resume the copy")
        values = config.read_yaml(saved, what="run's config.yaml")  # a local path or on object storage
        # The run is where it is resumed from, whatever config.yaml says (a moved or copied run).
        cfg = config.from_dict({**values, **config.parse_overrides(list(args.overrides)), "run_dir": str(args.resume)})
    else:
        cfg = config.load(args.config, args.overrides)
    # Before Ray starts: what can never run is a one-line error in a second.
    preflight.check(cfg, local=_starts_local_ray(args), new_run=not args.resume)
    orch = Orchestrator(cfg, progress=not args.no_progress, resume_dir=args.resume)  # reads the checkpoint
    connect_ray(args.address)
    stop = _StopSignals()
    stop.orch = orch
    failure = None
    try:
        with orch:
            try:
                orch.train()
            except (ReplicaError, DivergenceError, WriteError) as err:
                if orch.stopped_by is None:
                    raise
                failure = err  # the stop could not finish: what is on disk stands
    except StoppedAtOnce as err:
        if not stop.graceful:
            print(f"distrib: stopped by {err.signal_name} before training began; {_newest(orch)}", file=sys.stderr)
        else:
            print(f"distrib: stopped at once by a second {err.signal_name} after {orch.step_count} steps; "
                  f"{_newest(orch)}", file=sys.stderr)
        return _exit_code(err.signal_name)
    if orch.stopped_by is not None and failure is None and orch.step_count == orch.cfg.steps:
        # The last steps were queued before the stop came: they ran, with the run's end, so it is done.
        print(f"distrib: {orch.stopped_by} came as the run ended: all {orch.step_count} steps done", file=sys.stderr)
    elif orch.stopped_by is not None:
        return _report_stop(orch, failure)
    print(f"run directory: {orch.run_dir}")
    return 0


def _report_stop(orch, failure: ReplicaError | DivergenceError | WriteError | None) -> int:
    """The one line a stopped run ends with, and its exit code."""
    newest = orch.rundir.newest_written
    if failure is None and newest is not None and newest.name == f"step-{orch.step_count:08d}.ckpt":
        print(f"distrib: stopped by {orch.stopped_by} after {orch.step_count} steps; checkpoint {newest.name} "
              f"written; resume with: distrib train --resume {orch.run_dir}", file=sys.stderr)
    else:
        grace = f"; stop_grace_s={orch.cfg.stop_grace_s}" if isinstance(failure, ReplicaError) else ""
        why = f" ({failure}{grace})" if failure is not None else ""
        print(f"distrib: stopped by {orch.stopped_by} after {orch.step_count} steps without a new checkpoint{why}; "
              f"{_newest(orch)}", file=sys.stderr)
    return _exit_code(orch.stopped_by)


def _newest(orch) -> str:
    """Where a stopped run can be resumed from, in words."""
    if orch.rundir is None or not orch.rundir.path.exists():  # none made, or a failed start's removed
        return "nothing was written"
    newest = orch.rundir.newest_written
    if newest is None:
        return f"no checkpoint yet; metrics so far are in {orch.run_dir}"
    return f"the newest checkpoint is {newest.name}; resume with: distrib train --resume {orch.run_dir}"


def _seed_step(args: argparse.Namespace) -> int:
    from distrib.cluster import connect_ray
    from distrib.tutorial import seed_step, tutorial_config

    # Before Ray starts, as for train: a missing --weights file or cuda without a GPU is one line.
    preflight.check(tutorial_config(seed=args.seed, device=args.device, weights=args.weights),
                    local=_starts_local_ray(args))
    connect_ray(args.address)
    result = seed_step(seed=args.seed, device=args.device, weights=args.weights)
    print(f"device: {result.device}")
    print(f"loss through distrib (1 worker): {result.distrib_loss!r}")
    print(f"loss of the plain script:        {result.plain_loss!r}")
    print(f"largest parameter difference:    {result.max_param_diff!r}")
    return 0 if result.max_param_diff == 0 and result.distrib_loss == result.plain_loss else 1


def _scale(args: argparse.Namespace) -> int:
    from distrib.cluster import connect_ray
    from distrib.scale import check_out_dir, load_sweep, run_sweep
    from distrib.scale_report import format_table

    sweep = load_sweep(args.config)
    # Before Ray starts, and before anything is written: a bad out_dir or --resume is a one-line error.
    out_dir = check_out_dir(sweep, baseline=args.baseline, resume_dir=args.resume)
    for point in sweep.points():  # as train checks its config: a point that can never run stops none
        preflight.check(sweep.run_config(point, run_dir=str(out_dir / "points")), local=_starts_local_ray(args),
                        new_run=False)  # the sweep names its points' run directories itself
    connect_ray(args.address)
    out_dir, rows = run_sweep(sweep, baseline=args.baseline, out_dir=out_dir,
                              say=lambda text: print(text, file=sys.stderr, flush=True))
    print(format_table(rows))
    print(f"results: {out_dir} (results.csv, results.json, throughput.png, efficiency.png, breakdown.png)")
    return 0


def _check(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, args.overrides)
    # The paths `train` checks before Ray starts (not whether this machine could hold the run:
    # a config is often checked on a laptop for a cluster; nor whether run_dir is free: a run's
    # own config.yaml names the run it is in).
    preflight.check(cfg, local=False, new_run=False)
    print(yaml.safe_dump(config.to_dict(cfg), sort_keys=False), end="")
    return 0


def _export(args: argparse.Namespace) -> int:
    from distrib.export import export

    out = export(args.run_dir, args.out)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from distrib.export import evaluate_folder

    result = evaluate_folder(args.model, args.data, batch_size=args.batch_size)
    print(f"{result.count} images: loss {result.loss:.4f}, top-1 {result.top1:.4f}, top-5 {result.top5:.4f}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from distrib import simulate

    counts = _integers("--sweep", args.sweep) if args.sweep else [args.workers]
    per_call = _integers("--steps-per-call", args.steps_per_call)
    if counts == [None] or (not args.sweep and len(per_call) > 1):
        raise ConfigError("simulate: give --workers N (one --steps-per-call), or --sweep N1,N2,...")
    run = dict(step_ms=args.step_ms, steps=args.steps, calls_in_flight=args.calls_in_flight,
               check_every=args.check_every)
    # Before Ray starts: what can never be measured is a one-line error in a second.
    simulate.check(counts, steps_per_call=per_call, out_dir=Path(args.out) if args.sweep else None, **run)
    started = simulate.start_ray(args.address, max(counts))
    try:
        if not args.sweep:
            with tempfile.TemporaryDirectory() as run_dir:
                cfg = simulate.sim_config(counts[0], steps_per_call=per_call[0], run_dir=f"{run_dir}/run", **run)
                print(simulate.format_point(simulate.simulate(cfg)))
            return 0
        points, fits = simulate.sweep(counts, steps_per_call=per_call, out_dir=Path(args.out),
                                      say=lambda text: print(text, file=sys.stderr, flush=True), **run)
        print(simulate.format_table(points))
        print(simulate.format_fits(fits, step_ms=args.step_ms))
        print(f"results: {args.out} (points.json, driver_cost.png)")
        return 0
    finally:
        if started:
            import ray

            ray.shutdown()


def _integers(flag: str, text: str) -> list[int]:
    """`text` as comma-separated integers, e.g. 2,4,8; ConfigError naming `flag` otherwise."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is invalid: give comma-separated integers, e.g. 2,4,8") from None


def _report(args: argparse.Namespace) -> int:
    from distrib.report import report

    text, written = report(args.run_dirs, args.out)
    print(text)
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {"train": _train, "seed-step": _seed_step, "scale": _scale, "check": _check, "export": _export,
                    "evaluate": _evaluate, "report": _report, "simulate": _simulate}
        return commands[args.command](args)
    except (ConfigError, CheckpointError) as err:
        print(f"distrib: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distrib: interrupted", file=sys.stderr)
        return 130
    except (ReplicaError, DivergenceError, PlacementError, WriteError) as err:  # the traceback is in Ray's logs
        print(f"distrib: run failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
