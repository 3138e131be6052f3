"""Shared fixtures: one local Ray instance for the whole test session, small fast configs."""

from __future__ import annotations

import os
import sys

import pytest
import ray

from distrib.config import RunConfig
from distrib.warm import keep_warm, release

# Ray refuses to create an object that must spill to disk once the disk is fuller than
# local_fs_capacity_threshold (95%): OutOfDiskError. Snapshots and state reads spill where the
# object store is small, and a CI machine's shared disk, 95% full with 12 GB still free, once
# failed 4 tests that way. The tests need far less than 12 GB, so only a full disk stops them.
# Set before any Ray instance starts: its raylet reads it from the environment it inherits.
RAY_DISK_THRESHOLD_VAR = "RAY_local_fs_capacity_threshold"  # Ray's own spelling
os.environ.setdefault(RAY_DISK_THRESHOLD_VAR, "1")
# The replicas' FutureWarnings (torch's, on every import) are noise in the test log. Ray's workers
# inherit the raylet's environment, so this reaches them without a job runtime_env: one of those
# starts each worker through Ray's setup_worker.py, ~1.5 CPU-s more per replica process here
# (~150 of them in the suite).
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")


LOCAL_CPUS = 4
"""The shared local Ray instance's logical CPUs: 2 replicas plus room (a spare, a third rank)."""
IDLE_WAIT_S = 10
"""How long a module waits for the last one's replicas to hand their CPUs back."""


SHARED_RAY_MODULES = pytest.StashKey[set]()
"""The test modules that use ray_local, found at collection."""
_shared_ray_up = False
"""Whether the shared instance is the Ray instance this process is connected to."""


@pytest.fixture(scope="session")
def _local_ray_session():
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_local_ray_session):
    """A local Ray instance with LOCAL_CPUS logical CPUs, shared by the modules that use it
    (pytest_collection_modifyitems runs them one after another): each start and shutdown
    costs ~7 s and ~8 CPU-seconds. A module finds it idle, or gets a fresh one: if an earlier
    module left a placement group or CPUs held after IDLE_WAIT_S, it is restarted, so one
    module's leak cannot starve the next. The first module after them starts without it
    (pytest_runtest_setup), as modules with a Ray instance of their own expect. Within a
    module, a run that ends well keeps its replicas for the next run of the same shape
    (distrib.keep_warm): a 2-replica start is ~5.5 s here."""
    global _shared_ray_up
    if _shared_ray_up and not _idle(IDLE_WAIT_S):
        ray.shutdown()
        _shared_ray_up = False
    if not _shared_ray_up:
        ray.init(num_cpus=LOCAL_CPUS, include_dashboard=False, logging_level="WARNING")
        _shared_ray_up = True
    with keep_warm():  # runs of the same shape in a module share their replicas; released at its end
        yield


@pytest.fixture
def ray_address(ray_local) -> str:
    """The shared local Ray instance's address, for a CLI run (`--address`) to join rather than
    start a local instance of its own (~7 s). The replicas this process kept are released first:
    that run's driver cannot take them, and needs their CPUs."""
    release()
    return ray.get_runtime_context().gcs_address


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Shut the shared instance down before the first test of a module that does not use it."""
    global _shared_ray_up
    if _shared_ray_up and item.module not in item.config.stash[SHARED_RAY_MODULES]:
        ray.shutdown()
        _shared_ray_up = False


def _idle(timeout_s: float) -> bool:
    """Whether the shared instance holds no placement group and has all its CPUs free, waiting up
    to timeout_s for the last module's to go. A placement group still pending counts: it would
    take CPUs as soon as they free up."""
    import time

    from ray.util.placement_group import placement_group_table

    deadline = time.monotonic() + timeout_s
    while (ray.available_resources().get("CPU", 0) < LOCAL_CPUS
           or any(pg["state"] != "REMOVED" for pg in placement_group_table().values())):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def small_cfg(tmp_path) -> RunConfig:
    """2 CPU workers, 32 px images, batch 4 each, a 10-class head: a step takes milliseconds."""
    return RunConfig(num_workers=2, device="cpu", batch_size_per_worker=4, image_size=32, num_classes=10,
                     steps=4, lr=0.05, check_every=2, loader_workers=0, run_dir=str(tmp_path / "run"))


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """Real images to learn from: scikit-learn's digits as an ImageFolder (see tests/digits.py)."""
    from tests.digits import write_digits

    return write_digits(tmp_path_factory.mktemp("digits") / "train")


@pytest.fixture(scope="session")
def photos_folder(tmp_path_factory):
    """Real JPEGs of varied sizes: crops of a photograph matplotlib ships (see tests/photos.py)."""
    from tests.photos import write_photos

    return write_photos(tmp_path_factory.mktemp("photos") / "train")


def pytest_collection_modifyitems(config, items):
    """The modules that use the shared local Ray instance (ray_local) run first, one after
    another, in their usual order, then the others; GPU tests skip cleanly where torch sees no
    CUDA device (CI has none)."""
    uses_local_ray = {item.module for item in items if "ray_local" in item.fixturenames}
    config.stash[SHARED_RAY_MODULES] = uses_local_ray
    items.sort(key=lambda item: item.module not in uses_local_ray)  # stable: order kept within each part
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


EXIT_STATUS = pytest.StashKey[int]()
"""pytest's exit status, kept at the session's end for pytest_unconfigure."""


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process here, with pytest's exit status, once every report is written.

    Why not a normal exit: each module's ray.shutdown() leaves Ray's native threads (gRPC,
    the GCS client's event loop) running in this process, and the C++ static destructors
    that run at interpreter exit can race them. A CI run once ended "225 passed" and then died
    of SIGSEGV after it, failing a run whose tests all passed. (Not under coverage, which saves
    its data at exit, nor when a program runs pytest.main(): that program goes on.)"""
    if EXIT_STATUS not in config.stash or "coverage" in sys.modules or not _pytest_is_the_program():
        return  # no session ran; coverage saves its data at exit; pytest.main() inside a program
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[EXIT_STATUS])


def _pytest_is_the_program() -> bool:
    """True for `pytest ...` and `python -m pytest ...`; False for pytest.main() called by a program."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return (spec is not None and spec.name in ("pytest", "pytest.__main__")) or (
        os.path.basename(sys.argv[0]) in ("pytest", "py.test"))


def flat_state(state: dict):
    """Parameters, BatchNorm buffers and momentum buffers of a Replica.state(), under one namespace."""
    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    for index, entry in state["optimizer"]["state"].items():
        tensors[f"momentum.{index}"] = entry["momentum_buffer"]
    return tensors


def all_rank_states(orch) -> list[dict]:
    """Every rank's Replica.state(), after a check (which reconciles BatchNorm buffers, as every
    state read does)."""
    orch.check_consistency()
    return ray.get([replica.state.remote() for replica in orch.replicas])


def assert_bit_identical(ours: dict, theirs: dict) -> None:
    import torch

    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name} differs"
