"""The GPU path: NCCL replicas, bf16 and fp16, fingerprints of GPU tensors.

Skipped without CUDA (CI has none); run on a GPU machine with `pytest -m gpu`.
NCCL refuses two ranks on one GPU, so NCCL runs here have one replica; world size 2
shares the one GPU (gpus_per_worker: 0.5) over gloo with CUDA tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

from distrib import Orchestrator, RunConfig
from distrib.digest import device_checksum, device_checksums
from distrib.tutorial import seed_step
from tests.conftest import assert_bit_identical, flat_state

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("ray_local")]


def gpu_cfg(tmp_path, **changes) -> RunConfig:
    return RunConfig(num_workers=1, device="auto", batch_size_per_worker=16, image_size=64, steps=6,
                     steps_per_call=3, check_every=3, run_dir=str(tmp_path / "run")).replace(**changes)


def test_auto_picks_cuda_nccl_bf16_and_trains(tmp_path):
    with Orchestrator(gpu_cfg(tmp_path), progress=False) as orch:
        metrics = orch.train()
        resolved = orch.cfg
    assert (resolved.device, resolved.backend, resolved.precision) == ("cuda", "nccl", "bf16")
    assert len(metrics) == 6 and all(math.isfinite(m.loss) for m in metrics)
    assert orch.checks_passed >= 3


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_other_precisions_step(tmp_path, precision):
    with Orchestrator(gpu_cfg(tmp_path, precision=precision, channels_last=False), progress=False) as orch:
        metrics = orch.train()
    assert all(math.isfinite(m.loss) for m in metrics)


def test_device_checksum_matches_the_cpu_and_sees_changes():
    tensor = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    on_gpu = tensor.cuda()
    assert int(device_checksum(on_gpu)) == int(device_checksum(tensor))
    counts = torch.arange(5, dtype=torch.int64)  # the fused checksums, two element sizes, match too
    assert device_checksums([on_gpu, counts.cuda()]).tolist() == [int(device_checksum(tensor)),
                                                                    int(device_checksum(counts))]
    on_gpu[1234] = torch.nextafter(on_gpu[1234], torch.tensor(math.inf, device="cuda"))
    assert int(device_checksum(on_gpu)) != int(device_checksum(tensor))


def test_tutorial_step_on_gpu_gives_the_plain_loss():
    result = seed_step(seed=0, device="cuda")
    assert result.device == "cuda"
    assert result.distrib_loss == result.plain_loss
    assert result.max_param_diff < 1e-4


def test_resume_on_gpu(tmp_path):
    cfg = gpu_cfg(tmp_path, steps=6, steps_per_call=1, check_every=2, checkpoint_every=2)
    with Orchestrator(cfg, progress=False) as orch:
        orch.train(3)
    with Orchestrator(cfg, progress=False, resume_dir=cfg.run_dir) as orch:
        assert orch.step_count == 2
        metrics = orch.train()
    assert [m.step for m in metrics] == [2, 3, 4, 5]


def test_sweep_point_on_gpu(tmp_path):
    from distrib.scale import SweepConfig, run_sweep

    sweep = SweepConfig(base=gpu_cfg(tmp_path), sweep={"num_workers": (1,)}, warmup_steps=3, timed_steps=6,
                        out_dir=str(tmp_path / "sweep"))
    _, rows = run_sweep(sweep, say=lambda text: None)
    (row,) = rows
    assert row["device"] == "cuda" and row["backend"] == "nccl" and row["images_per_s"] > 0
    assert row["backward_compute_s"] > 0 and row["efficiency"] == 1.0


def shared_cfg(tmp_path, name: str, **changes) -> RunConfig:
    """Two replicas on one GPU (Ray's fractional GPUs), gloo with CUDA tensors, sync BatchNorm."""
    return gpu_cfg(tmp_path, num_workers=2, gpus_per_worker=0.5, batchnorm="sync", check_every=1,
                   checkpoint_every=2, run_dir=str(tmp_path / name)).replace(**changes)


def test_two_replicas_share_one_gpu_over_gloo_and_stay_identical(tmp_path):
    with Orchestrator(shared_cfg(tmp_path, "shared"), progress=False) as orch:
        metrics = orch.train()
        resolved = orch.cfg
    assert (resolved.device, resolved.backend, resolved.num_workers) == ("cuda", "gloo", 2)
    assert len(metrics) == 6 and all(math.isfinite(m.loss) for m in metrics)
    assert orch.checks_passed >= 6  # every step's fingerprints equal on both replicas


def test_a_killed_replica_on_a_shared_gpu_heals_bit_identical(tmp_path):
    # Deterministic kernels, as on a CPU: without them (cuDNN benchmarking, bf16) this test
    # failed on an H200, conv1 weights up to 9e-3 apart after 6 steps. Whether the heal or the
    # kernels' own run-to-run differences caused that is still to be measured.
    states = {}
    for name, faults in (("plain", ""), ("healed", "kill:1@3")):
        cfg = shared_cfg(tmp_path, name, faults=faults, deterministic=True)
        with Orchestrator(cfg, progress=False) as orch:
            orch.train()
            states[name] = flat_state(orch.state())
    assert_bit_identical(states["healed"], states["plain"])
    assert '"event": "heal"' in (tmp_path / "healed" / "events.jsonl").read_text()


def test_two_replicas_train_on_jpegs_decoded_by_nvjpeg(tmp_path, photos_folder):
    cfg = shared_cfg(tmp_path, "nvjpeg", data="folder", data_dir=str(photos_folder), num_classes=2,
                     decoder="nvjpeg", checkpoint_every=0)
    with Orchestrator(cfg, progress=False) as orch:
        metrics = orch.train()
    assert len(metrics) == 6 and all(math.isfinite(m.loss) for m in metrics)
    assert orch.checks_passed >= 6
