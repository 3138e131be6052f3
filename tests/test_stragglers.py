"""Stragglers: the rank that holds its peers up is named once, from the time before each
step's first collective; per-rank phase times go to summary.json. A real run with a
`slow:R@S` fault (real Ray actors, real gloo), and the rule on hand-made records."""

from __future__ import annotations

import json

import pytest

from distrib import Orchestrator, RunConfig
from distrib.faults import SLOW_DELAY_S
from distrib.stragglers import STRAGGLER_WINDOW, StragglerWatch


def record(data_s: float, forward_s: float, backward_s: float = 0.05) -> dict:
    return {"step": 0, "loss": 1.0, "data_s": data_s, "forward_s": forward_s, "backward_s": backward_s,
            "optimizer_s": 0.01, "comm_s": 0.0}


def watch(batchnorm: str = "train", fraction: float = 0.25) -> tuple[StragglerWatch, list[str]]:
    said: list[str] = []
    cfg = RunConfig(batchnorm=batchnorm, straggler_fraction=fraction)
    return StragglerWatch(cfg, say=said.append, name=lambda rank: f"rank {rank} (node n, pid p)"), said


def test_a_rank_late_to_its_first_collective_is_named_once():
    stragglers, said = watch()
    for _ in range(STRAGGLER_WINDOW * 2):  # the peer waits for it inside backward: that is not counted
        stragglers.step([record(0.01, 0.05, backward_s=0.15), record(0.11, 0.05)], step_s=0.2)
    assert stragglers.named == [1] and len(said) == 1
    assert said[0].startswith("straggler: rank 1 (node n, pid p) is 100 ms behind the fastest rank")
    assert "(data + forward), 50% of a 200 ms step" in said[0]
    ranks = stragglers.summary()["ranks"]
    assert ranks[1]["data_s"] == pytest.approx(0.11) and ranks[0]["backward_s"] == pytest.approx(0.15)


def test_under_sync_batchnorm_only_the_batch_counts_and_outliers_name_nobody():
    stragglers, said = watch(batchnorm="sync")
    for step in range(STRAGGLER_WINDOW * 2):
        slow_batch = 0.5 if step % 5 == 0 else 0.01  # one slow batch in five: the median ignores it
        # the fast rank waits for the other's statistics inside forward: not its own lateness
        stragglers.step([record(0.01, 0.2), record(slow_batch, 0.05)], step_s=0.3)
    assert stragglers.named == [] and said == []
    stragglers, said = watch(fraction=0)
    for _ in range(STRAGGLER_WINDOW):
        stragglers.step([record(0.01, 0.05), record(0.5, 0.05)], step_s=0.6)
    assert said == []  # 0 = off


def test_a_group_formed_again_is_judged_anew_and_a_shrunk_one_not_at_all():
    """A shrunk group's rank 0 trains two shards (its lead time twice a shard's, by design), and
    a rank replaced in a heal is not the one whose steps filled the window."""
    stragglers, said = watch()
    stragglers.formed(whole=False)
    for _ in range(STRAGGLER_WINDOW * 2):
        stragglers.step([record(0.02, 0.10), record(0.01, 0.05), record(0.01, 0.05)], step_s=0.2)
    assert said == []
    stragglers.formed(whole=True)
    for _ in range(STRAGGLER_WINDOW - 1):  # the window was cleared: it is not full yet
        stragglers.step([record(0.01, 0.05), record(0.11, 0.05)], step_s=0.2)
    assert said == []
    stragglers.step([record(0.01, 0.05), record(0.11, 0.05)], step_s=0.2)
    assert stragglers.named == [1]


def test_the_hang_limit_gives_a_group_formed_again_its_first_calls():
    """After a restart or heal the first calls are slow again (loaders, torch.compile, cuDNN's
    autotuning): step_timeout_s, not the limit the steady steps derived, until 3 calls are timed;
    and it counts calls, not steps (a call of 4 steps is one)."""
    from distrib.hang import MIN_TIMED_CALLS, HangLimit

    limit = HangLimit(RunConfig(step_timeout_s=300.0, hang_timeout_factor=10.0, hang_timeout_min_s=1.0))
    limit.record(0.05, 4)
    assert limit.limit_s(4) == 300.0 and limit.stall_limit_s() is None  # 4 steps timed, but one call
    for _ in range(MIN_TIMED_CALLS - 1):
        limit.record(0.05, 4)
    assert limit.limit_s(4) == pytest.approx(2.0) and limit.stall_limit_s() == 3.0
    limit.formed()
    assert limit.limit_s(4) == 300.0 and limit.stall_limit_s() is None


@pytest.mark.usefixtures("ray_local")
def test_a_slow_rank_is_named_while_the_run_goes_on(tmp_path, capfd):
    steps = STRAGGLER_WINDOW + 6
    cfg = RunConfig(num_workers=2, device="cpu", batch_size_per_worker=2, image_size=32, num_classes=10, steps=steps,
                    check_every=0, checkpoint_every=0, loader_workers=0, faults="slow:1@3",
                    run_dir=str(tmp_path / "run"))
    with Orchestrator(cfg, progress=True) as orch:
        orch.train()
    lines = [line for line in capfd.readouterr().err.splitlines() if "straggler:" in line]
    assert len(lines) == 1 and "straggler: rank 1 (node " in lines[0], lines
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["stragglers"]
    assert summary["named"] == [1] and summary["lead_phases"] == ["data_s", "forward_s"]
    rank0, rank1 = summary["ranks"]
    assert rank1["data_s"] > SLOW_DELAY_S * 0.8 > rank0["data_s"]
