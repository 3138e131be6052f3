"""Real Ray actors and real gloo process groups on the CPU: lockstep training behaves as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
import torch

from distrib import DivergenceError, Orchestrator
from distrib.tutorial import plain_tutorial_step, seed_step
from tests.conftest import all_rank_states, flat_state

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("ray_local")


def test_two_replicas_stay_bit_identical_and_a_divergence_is_named(small_cfg):
    with Orchestrator(small_cfg, progress=False) as orch:
        initial = flat_state(all_rank_states(orch)[0])
        metrics = orch.train()
        rank0, rank1 = (flat_state(s) for s in all_rank_states(orch))
        run_dir = orch.run_dir
        # The check compares every rank's fingerprint with rank 0's: one changed checksum is named.
        prints = ray.get([r.fingerprint.remote() for r in orch.replicas])
        name, value = prints[1][5]
        prints[1][5] = (name, value + 1)
        with pytest.raises(DivergenceError, match=rf"rank 1 \(node .*\) differs from rank 0, first in {name}"):
            orch.compare(prints, after_step=3)
    assert [m.step for m in metrics] == [0, 1, 2, 3]
    assert orch.checks_passed >= 3  # start-up, after step 1, after step 3
    assert rank0.keys() == rank1.keys() and any(k.startswith("momentum.") for k in rank0)
    assert any("running_mean" in k for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert not torch.equal(rank0["model.fc.weight"], initial["model.fc.weight"])  # it did train
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


# Each loss and each kind of data once (the sum loss takes synthetic data only): the sum loss's
# rescale and a dataset's sharding are independent, and either one wrong breaks its case by
# orders of magnitude.
@pytest.mark.parametrize(("loss", "data_source"), [("sum", "synthetic"), ("cross_entropy", "fake")])
def test_n_workers_equal_one_worker_on_the_same_global_batch(small_cfg, tmp_path, loss, data_source):
    """2 workers x batch 4 == 1 worker x batch 8, up to float32 summation order.

    BatchNorm is frozen (eval mode), so its statistics do not depend on the sharding.
    The two runs add the same numbers in a different order (two half-batch gradients
    averaged by the all-reduce vs one full batch), so they agree to float32 rounding,
    not bit for bit: after 3 steps we allow 1e-4 relative, 1e-6 absolute (measured:
    at most 1.2e-7 apart, while parameters moved by 1e-3 to 2e-1). A wrong shard,
    a missing rescale of the sum loss or unsynchronised gradients breaks this by orders
    of magnitude (checked below against an honest step of training).
    """
    # The sum loss grows with the batch, so it needs a far smaller step to stay finite.
    # NCHW: in NHWC oneDNN picks different kernels for batch 4 and batch 8, whose rounding
    # differs more (measured: 7e-5 against 1e-7 after 3 steps on FakeData).
    base = small_cfg.replace(loss=loss, data=data_source, batchnorm="frozen", steps=3, dataset_size=64,
                             lr=1e-4 if loss == "sum" else 0.05, channels_last=False)
    results = {}
    for workers, batch in ((2, 4), (1, 8)):
        cfg = base.replace(num_workers=workers, batch_size_per_worker=batch, run_dir=str(tmp_path / f"w{workers}"))
        with Orchestrator(cfg, progress=False) as orch:
            start = flat_state(orch.state())
            metrics = orch.train()
            results[workers] = (flat_state(orch.state()), [m.loss for m in metrics])
    (two, two_losses), (one, one_losses) = results[2], results[1]
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    moved = max((one[k] - start[k]).abs().max().item() for k in one if k in start)
    assert moved > 1e-3
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_tutorial_step_is_reproduced_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scratch = set(Path(tempfile.gettempdir()).glob("distrib-seed-step-*"))
    result = seed_step(seed=0, device="cpu")
    assert list(tmp_path.iterdir()) == []  # a check leaves nothing where it is run
    assert set(Path(tempfile.gettempdir()).glob("distrib-seed-step-*")) == scratch  # nor its scratch folder
    assert result.max_param_diff == 0.0
    assert result.distrib_loss == result.plain_loss
    other_loss, _ = plain_tutorial_step(seed=1, device="cpu", weights=None)
    assert other_loss != result.plain_loss  # the comparison is sensitive to the seed


def test_image_folder_of_odd_sizes_gives_square_samples(small_cfg, tmp_path):
    """Images neither square nor image_size (40 x 48 PNGs) become image_size squares, so a batch
    stacks, with or without augmentation. (Real-image runs through Ray: test_real_training.)"""
    from PIL import Image

    from distrib.data import training_dataset

    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 48), color=(i * 80, 10, 200 if label == "cat" else 0)).save(
                tmp_path / "images" / label / f"{i}.png")
    for augment in ("none", "standard"):
        cfg = small_cfg.replace(data="folder", data_dir=str(tmp_path / "images"), num_classes=2, augment=augment)
        dataset = training_dataset(cfg)
        samples = [dataset[(index, 0)] for index in range(len(dataset))]  # (index, position in the batch)
        assert all(image.shape == (3, 32, 32) for image, _ in samples)
        assert sorted(label for _, label in samples) == [0, 0, 0, 1, 1, 1]


def test_cli_default_config_end_to_end(tmp_path):
    """The README's run command, shortened: its own local Ray, exit 0, metrics written."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "distrib", "train", "--config", str(REPO / "configs" / "local.yaml"),
         "--set", "steps=3", "--set", f"run_dir={tmp_path / 'cli-run'}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (tmp_path / "cli-run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
    assert "images/s" in done.stderr and "run directory" in done.stdout
