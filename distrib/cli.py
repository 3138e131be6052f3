"""`distrib train | scale | seed-step | check`: the command line, over the same code as the Python API.

Exit codes: 0 done; 1 the run failed (a replica died, hung or diverged); 2 bad
input (the message names the key, the value and the fix); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from distrib import config
from distrib.errors import CheckpointError, ConfigError, DivergenceError, PlacementError, ReplicaError


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
    return parser


def _train(args: argparse.Namespace) -> int:
    from distrib.driver import Orchestrator
    from distrib.group import connect_ray

    if args.resume:
        if args.config:
            raise ConfigError("--config and --resume: pick one; a resumed run uses RUN_DIR/config.yaml (and --set)")
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume!r} is invalid: no config.yaml there; give a run directory")
        cfg = config.load(saved, args.overrides)
    else:
        cfg = config.load(args.config, args.overrides)
    connect_ray(args.address)
    with Orchestrator(cfg, progress=not args.no_progress, resume_dir=args.resume) as orch:
        try:
            orch.train()
        except KeyboardInterrupt:
            print(f"distrib: interrupted after step {orch.step_count - 1}; metrics so far are in "
                  f"{orch.run_dir}", file=sys.stderr)
            return 130
        print(f"run directory: {orch.run_dir}")
    return 0


def _seed_step(args: argparse.Namespace) -> int:
    from distrib.group import connect_ray
    from distrib.tutorial import seed_step

    connect_ray(args.address)
    result = seed_step(seed=args.seed, device=args.device, weights=args.weights)
    print(f"device: {result.device}")
    print(f"loss through distrib (1 worker): {result.distrib_loss!r}")
    print(f"loss of the plain script:        {result.plain_loss!r}")
    print(f"largest parameter difference:    {result.max_param_diff!r}")
    return 0 if result.max_param_diff == 0 and result.distrib_loss == result.plain_loss else 1


def _scale(args: argparse.Namespace) -> int:
    from distrib.group import connect_ray
    from distrib.scale import load_sweep, run_sweep
    from distrib.scale_report import format_table

    sweep = load_sweep(args.config)
    connect_ray(args.address)
    out_dir, rows = run_sweep(sweep, baseline=args.baseline, resume_dir=args.resume,
                              say=lambda text: print(text, file=sys.stderr, flush=True))
    print(format_table(rows))
    print(f"results: {out_dir} (results.csv, results.json, throughput.png, efficiency.png, breakdown.png)")
    return 0


def _check(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, args.overrides)
    print(yaml.safe_dump(config.to_dict(cfg), sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"train": _train, "seed-step": _seed_step, "scale": _scale, "check": _check}[args.command](args)
    except (ConfigError, CheckpointError) as err:
        print(f"distrib: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distrib: interrupted", file=sys.stderr)
        return 130
    except (ReplicaError, DivergenceError, PlacementError) as err:  # the traceback is in Ray's logs
        print(f"distrib: run failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
