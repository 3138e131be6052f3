"""keep_warm: a run's start on kept replicas against a start on fresh ones, in one driver.

The default job's shape (configs/local.yaml: 2 CPU workers, resnet18 at 64 px, batch 32 per
worker, gloo) on one local Ray instance. Each round times, from `Orchestrator.start()` to its
return (placement, replica start-up, model set-up, rendezvous, the start-up consistency check),
one start on fresh actors (`keep_warm(False)`) and one on the actors the run before kept; the
order flips every round, so drift in the machine's load hits both. Each run then trains
--steps steps, which are not timed. Prints each round's two start times and their ratio, and
the medians.

    .venv/bin/python bench/warm_start.py [--rounds 3] [--steps 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray

from distrib import Orchestrator, keep_warm, load_config, warm

REPO = Path(__file__).resolve().parents[1]


def timed_start(cfg) -> float:
    """Seconds Orchestrator.start() takes; the run then trains its steps and ends well."""
    orch = Orchestrator(cfg, progress=False)
    started = time.perf_counter()
    orch.start()
    took_s = time.perf_counter() - started
    orch.train()
    orch.shutdown(orderly=True)  # as a `with` block that ends well: keeps the replicas if warm
    return took_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    ray.init(include_dashboard=False, logging_level="WARNING")
    base = load_config(REPO / "configs" / "local.yaml", [f"steps={args.steps}"])
    times: dict[str, list[float]] = {"fresh": [], "kept": []}
    with tempfile.TemporaryDirectory() as tmp, keep_warm():
        timed_start(base.replace(run_dir=f"{tmp}/warm-up"))  # the driver's own first-run imports; keeps a group
        for round_index in range(args.rounds):
            order = ("kept", "fresh") if round_index % 2 == 0 else ("fresh", "kept")
            for kind in order:
                cfg = base.replace(run_dir=f"{tmp}/{round_index}-{kind}")
                if kind == "fresh":
                    with keep_warm(False):
                        times[kind].append(timed_start(cfg))
                    timed_start(base.replace(run_dir=f"{tmp}/{round_index}-refill"))  # keep a group again
                else:
                    times[kind].append(timed_start(cfg))
            print(f"round {round_index + 1}: start on fresh replicas {times['fresh'][-1]:.2f} s, on kept ones "
                  f"{times['kept'][-1]:.2f} s: kept / fresh {times['kept'][-1] / times['fresh'][-1]:.3f}", flush=True)
        warm.release()
    fresh, kept = statistics.median(times["fresh"]), statistics.median(times["kept"])
    print(f"median over {args.rounds} rounds: fresh {fresh:.2f} s, kept {kept:.2f} s, kept / fresh {kept / fresh:.3f}")


if __name__ == "__main__":
    main()
