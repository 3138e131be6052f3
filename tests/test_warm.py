"""keep_warm: a finished run's replicas serve the next run of the same shape, with the same numbers;
kept groups give their resources back when a run needs them."""

from __future__ import annotations

import pytest
from ray.util.placement_group import placement_group_table, remove_placement_group

from distrib import Orchestrator, ReplicaError, keep_warm, warm
from distrib.cluster import place_bundles
from tests.conftest import assert_bit_identical, flat_state

pytestmark = pytest.mark.usefixtures("ray_local")


def run(cfg) -> tuple[list[int], dict]:
    """The replicas' pids and the final state of one run of cfg."""
    with Orchestrator(cfg, progress=False) as orch:
        orch.train()
        return [node.pid for node in orch.nodes], flat_state(orch.state())


def alive(pids: list[int]) -> bool:
    import os

    try:
        for pid in pids:
            os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: list[int], timeout_s: float = 30) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive([pid]) for pid in pids):
        time.sleep(0.1)
    return not any(alive([pid]) for pid in pids)


def test_a_kept_group_serves_the_next_run_of_its_shape_with_the_same_numbers(small_cfg, tmp_path):
    with keep_warm():
        warm.release()  # start from fresh actors, whatever earlier tests kept
        fresh_pids, fresh = run(small_cfg.replace(run_dir=str(tmp_path / "a")))
        # Another run of the same shape (its own config otherwise: another lr would do) takes
        # the same processes and, building all of its state anew, ends bit-identical.
        kept_pids, kept = run(small_cfg.replace(run_dir=str(tmp_path / "b")))
        assert kept_pids == fresh_pids
        assert_bit_identical(kept, fresh)

        # A run that fails keeps nothing: its replicas are killed, and the next run starts afresh.
        with pytest.raises(ReplicaError), Orchestrator(
                small_cfg.replace(run_dir=str(tmp_path / "c"), faults="error:0@1", max_restarts=0),
                progress=False) as orch:
            assert [node.pid for node in orch.nodes] == fresh_pids
            orch.train()
        assert wait_gone(fresh_pids)
        new_pids, _ = run(small_cfg.replace(run_dir=str(tmp_path / "d"), steps=1))
        assert not set(new_pids) & set(fresh_pids) and alive(new_pids)

        # A run of another shape, with room beside the kept group (1 CPU of the 4), leaves it kept:
        # the run after it, of the first shape, is warm again, and both groups are then kept.
        one_pids, _ = run(small_cfg.replace(run_dir=str(tmp_path / "e"), num_workers=1, steps=1))
        again_pids, _ = run(small_cfg.replace(run_dir=str(tmp_path / "f"), steps=1))
        assert again_pids == new_pids and alive(one_pids)
        assert len(live_placement_groups()) == 2

        # A third shape releases the group used longest ago (the 1-worker one) once it is kept.
        half_pids, _ = run(small_cfg.replace(run_dir=str(tmp_path / "g"), num_workers=1, cpus_per_worker=0.5,
                                             steps=1))
        assert wait_gone(one_pids) and alive(new_pids + half_pids)

        # Bundles that cannot be placed beside the kept groups (3 CPUs; 1.5 of the 4 are free)
        # make room: every kept group is released, and the bundles are placed.
        placement = place_bundles(small_cfg.replace(cpus_per_worker=1.5), say=print, check_abort=lambda: None,
                                  make_room=warm.release)
        assert wait_gone(new_pids + half_pids)
        assert live_placement_groups() == [placement.id.hex()]
        remove_placement_group(placement)

        last_pids, _ = run(small_cfg.replace(run_dir=str(tmp_path / "h"), steps=1))
    # Leaving the block (the fixture keeps replicas too, so turn it off here) releases them.
    with keep_warm(False):
        assert wait_gone(last_pids)
        assert live_placement_groups() == []


def live_placement_groups() -> list[str]:
    return [pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"]


def test_a_group_kept_from_an_ended_ray_connection_is_dropped_not_called(small_cfg):
    """After ray.shutdown() and a new ray.init(), the kept handles belong to a cluster (or job)
    that is gone: calling them raises in Ray's core worker. They are dropped unread."""

    class Gone:  # any call on it fails the test
        def __getattr__(self, name):
            raise AssertionError(f"a handle of an ended connection was called: {name}")

    stale_shape = ("127.0.0.1:1", "a node of another session", "01000000", *warm.shape(small_cfg)[3:])
    with keep_warm():
        warm.keep(warm.KeptGroup(stale_shape, Gone(), [Gone(), Gone()], [0, 1], None), [])
        assert warm.take(small_cfg) is None
        warm.keep(warm.KeptGroup(stale_shape, Gone(), [Gone(), Gone()], [0, 1], None), [])
        warm.release()
