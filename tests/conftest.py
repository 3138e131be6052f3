"""Shared fixtures: one local Ray instance for the whole test session, small fast configs."""

from __future__ import annotations

import os
import sys

import pytest
import ray

from distrib.config import RunConfig

# Ray refuses to create an object that must spill to disk once the disk is fuller than
# local_fs_capacity_threshold (95%): OutOfDiskError. Snapshots and state reads spill where the
# object store is small, and a CI machine's shared disk, 95% full with 12 GB still free, once
# failed 4 tests that way. The tests need far less than 12 GB, so only a full disk stops them.
# Set before any Ray instance starts: its raylet reads it from the environment it inherits.
RAY_DISK_THRESHOLD_VAR = "RAY_local_fs_capacity_threshold"  # Ray's own spelling
os.environ.setdefault(RAY_DISK_THRESHOLD_VAR, "1")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance with 4 logical CPUs (2 replicas plus room), for one test module."""
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::FutureWarning"}})
    yield
    ray.shutdown()


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
    """GPU tests skip cleanly where torch sees no CUDA device (CI has none)."""
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


def assert_bit_identical(ours: dict, theirs: dict) -> None:
    import torch

    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name} differs"
