"""keep_warm: a finished run's replicas serve the next run of the same shape, with the same numbers."""

from __future__ import annotations

import pytest
from ray.util.placement_group import placement_group_table

from distrib import Orchestrator, ReplicaError, keep_warm, warm
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

        # A run of another shape releases what is kept before it places its own group.
        assert warm.take(small_cfg.replace(num_workers=3)) is None
        assert wait_gone(new_pids)
        assert [pg["state"] for pg in placement_group_table().values() if pg["state"] != "REMOVED"] == []

        last_pids, _ = run(small_cfg.replace(run_dir=str(tmp_path / "e"), steps=1))
    # Leaving the block (the fixture keeps replicas too, so turn it off here) releases them.
    with keep_warm(False):
        assert wait_gone(last_pids)
        assert [pg["state"] for pg in placement_group_table().values() if pg["state"] != "REMOVED"] == []


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
