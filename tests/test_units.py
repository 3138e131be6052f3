"""Pure units: sharding maths, dataset order, metric aggregation, state checksums, weights files."""

from __future__ import annotations

import pytest
import torch
import torchvision

from distrib import data
from distrib.config import ConfigError, RunConfig
from distrib.digest import device_checksum, device_checksums, host_checksum
from distrib.metrics import aggregate, summarize
from distrib.model import load_weights
from distrib.protocol import shards_of


@pytest.mark.parametrize("loss", ["cross_entropy", "sum"])
def test_shards_of_two_workers_make_the_one_worker_batch(loss):
    kwargs = dict(seed=3, step=5, global_batch_size=8, image_size=32, num_classes=10, loss=loss)
    images, targets = data.synthetic_global_batch(**kwargs)
    shards = [(images[data.shard_rows(r, 4)], targets[data.shard_rows(r, 4)]) for r in range(2)]
    assert torch.equal(torch.cat([s[0] for s in shards]), images)
    assert torch.equal(torch.cat([s[1] for s in shards]), targets)
    again, _ = data.synthetic_global_batch(**kwargs)
    other_step, _ = data.synthetic_global_batch(**{**kwargs, "step": 6})
    assert torch.equal(again, images) and not torch.equal(other_step, images)
    assert targets.shape == ((8, 10) if loss == "sum" else (8,))


def test_shrunk_ranks_share_out_every_logical_shard_once():
    assert shards_of(4, 4) == [[0], [1], [2], [3]]  # full size: rank r has shard r
    for world_size in (1, 2, 3):
        shards = shards_of(4, world_size)
        assert len(shards) == world_size and sorted(sum(shards, [])) == [0, 1, 2, 3]
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_step_seed_is_injective_over_seed_and_step():
    seeds = {data.step_seed(seed, step) for seed in (0, 1, 2**31 - 1) for step in (0, 1, 2**32 - 1)}
    assert len(seeds) == 9


def test_stream_positions_cover_each_epoch_once():
    size, global_batch = 10, 4
    positions = [p for step in range(5) for rank in range(2)
                 for p in data.shard_positions(step=step, shard=rank, batch_size_per_worker=2,
                                               global_batch_size=global_batch)]
    assert positions == list(range(20))
    indices = data.dataset_indices(range(20), seed=1, dataset_size=size)
    assert sorted(indices[:10]) == list(range(10)) and sorted(indices[10:]) == list(range(10))
    assert indices[:10] != indices[10:]  # a fresh permutation each epoch


def test_aggregate_defines_the_loss_on_the_global_batch():
    records = [{"loss": 2.0, "data_s": 0.1, "forward_s": 0.2, "backward_s": 0.3, "optimizer_s": 0.1, "comm_s": 0.2},
               {"loss": 4.0, "data_s": 0.1, "forward_s": 0.4, "backward_s": 0.3, "optimizer_s": 0.1, "comm_s": 0.1}]
    mean = aggregate(step=0, rank_records=records, loss_kind="cross_entropy", global_batch_size=8,
                     wall_s=0.5, finished_at=0.0, lr=0.1)
    total = aggregate(step=0, rank_records=records, loss_kind="sum", global_batch_size=8, wall_s=0.5,
                      finished_at=0.0, lr=0.1)
    assert mean.loss == 3.0 and total.loss == 6.0
    assert mean.images_per_s == 16.0 and mean.forward_s == pytest.approx(0.3)
    assert mean.step_s == pytest.approx(0.9)  # the slowest rank
    summary = summarize([mean, total, mean], global_batch_size=8)
    assert summary["timed_steps"] == 2 and summary["images_per_s"] == pytest.approx(16.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.float64])
@pytest.mark.parametrize("checksum", [host_checksum, lambda t: int(device_checksum(t))], ids=["host", "device"])
def test_checksum_sees_any_single_element_change(dtype, checksum):
    tensor = (torch.arange(1000) % 17).to(dtype)
    base = checksum(tensor)
    assert checksum(tensor.clone()) == base
    for index in (0, 1, 500, 999):
        changed = tensor.clone()
        changed[index] += 1
        assert checksum(changed) != base
    swapped = tensor.clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert checksum(swapped) != base  # position matters, not just the multiset


def test_fused_device_checksums_equal_the_per_tensor_ones():
    """The fused checksums (a few kernels per element size) give device_checksum's value for
    each tensor, in order, whatever the mix of sizes, dtypes, layouts and empty tensors; and
    a changed element changes its own tensor's value only (the cached layout holds no values)."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.empty(0), torch.randn(3, 70000, generator=generator),
               torch.randn(8, 3, 5, 5, generator=generator).to(memory_format=torch.channels_last),
               torch.tensor(7, dtype=torch.int64), torch.randn(100, generator=generator).to(torch.bfloat16),
               torch.randint(-2**40, 2**40, (999,), generator=generator), torch.randn(1, generator=generator),
               torch.empty(0, dtype=torch.int64), torch.randn(65521 * 2 + 5, generator=generator)]
    expected = [int(device_checksum(t)) for t in tensors]
    assert device_checksums(tensors).tolist() == expected
    assert device_checksums([]).tolist() == []
    tensors[5][998] += 1
    changed = device_checksums(tensors).tolist()
    assert changed[5] != expected[5] and changed[:5] + changed[6:] == expected[:5] + expected[6:]
    assert changed[5] == int(device_checksum(tensors[5]))


def test_weights_file_is_checked_against_the_model(tmp_path):
    path = tmp_path / "ten.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    state = load_weights(str(path), num_classes=10)
    assert state["fc.weight"].shape == (10, 512)
    with pytest.raises(ConfigError, match=r"does not fit resnet18 with num_classes=1000 \(first mismatch: fc"):
        load_weights(str(path), num_classes=1000)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_weights(str(garbage), num_classes=10)
    with pytest.raises(ConfigError, match="no such file"):
        load_weights(str(tmp_path / "absent.pth"), num_classes=10)


def test_default_weights_offline_names_file_and_cache(tmp_path, monkeypatch):
    """No network and no cached file: the error names the file and the folder to put it in."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError) as err:
        load_weights("DEFAULT", num_classes=1000)
    assert "resnet18-f37072fd.pth" in str(err.value) and str(tmp_path / "hub" / "checkpoints") in str(err.value)


def test_run_config_rejects_sum_loss_on_real_data():
    with pytest.raises(ConfigError):
        RunConfig(loss="sum", data="fake")


def test_modules_and_functions_stay_small():
    """One concern per module: none over ~400 lines, no function over ~60 (DESIGN.md, issue 9)."""
    import ast
    from pathlib import Path

    too_big = []
    for path in sorted((Path(__file__).resolve().parents[1] / "distrib").glob("*.py")):
        text = path.read_text()
        if text.count("\n") > 420:
            too_big.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_big.append(f"{path.name}: {node.name}() has {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, "; ".join(too_big)


def test_schedules_warm_up_then_decay():
    import math

    from distrib.schedule import lr_at

    cosine = RunConfig(steps=10, lr=0.1, warmup_steps=2, lr_schedule="cosine")
    assert [lr_at(cosine, s) for s in (0, 1)] == [0.05, 0.1]
    assert lr_at(cosine, 6) == pytest.approx(0.05)
    assert lr_at(cosine, 9) == pytest.approx(0.1 * (1 + math.cos(math.pi * 7 / 8)) / 2)
    step = RunConfig(steps=10, lr=0.1, lr_schedule="step", lr_milestones=(3, 6), lr_gamma=0.5)
    assert [lr_at(step, s) for s in (2, 3, 5, 6, 9)] == [0.1, 0.05, 0.05, 0.025, 0.025]
    # A milestone inside the warm-up scales its rates too: the rate never climbs past a decay.
    early = step.replace(warmup_steps=4, lr_milestones=(2,), lr_gamma=0.1)
    assert [lr_at(early, s) for s in range(6)] == pytest.approx([0.025, 0.05, 0.0075, 0.01, 0.01, 0.01])
    scaled = RunConfig(num_workers=4, batch_size_per_worker=32, lr=0.1, lr_scaling="linear", base_batch_size=256)
    assert lr_at(scaled, 0) == pytest.approx(0.05)  # 0.1 x 128 / 256


def test_held_out_split_is_seeded_per_class_and_leaves_training_images():
    targets = [0] * 10 + [1] * 3 + [2]
    train, held_out = data.split_held_out(targets, fraction=0.2, seed=0)
    assert sorted(train + held_out) == list(range(14)) and not set(train) & set(held_out)
    assert [sum(targets[i] == c for i in held_out) for c in (0, 1, 2)] == [2, 1, 1]  # at least 1 per class
    assert (train, held_out) == data.split_held_out(targets, fraction=0.2, seed=0)
    assert held_out != data.split_held_out(targets, fraction=0.2, seed=1)[1]


def test_folder_image_extensions_match_torchvision():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from distrib.folders import IMAGE_EXTENSIONS

    assert set(IMAGE_EXTENSIONS) == set(IMG_EXTENSIONS)


def test_cadence_orders_boundary_calls():
    from distrib.cadence import boundary_calls, call_length

    cfg = RunConfig(steps=12, check_every=2, checkpoint_every=4, eval_every=3, steps_per_call=5)
    assert [boundary_calls(cfg, s) for s in (2, 3, 4, 6, 12)] == [["check"], ["eval"], ["checkpoint"],
                                                                  ["check", "eval"], ["checkpoint", "eval"]]
    assert [call_length(cfg, first, 12) for first in (0, 2, 3, 11)] == [2, 1, 1, 1]
    assert boundary_calls(cfg.replace(eval_every=0), 12) == ["checkpoint"]


def test_stall_watch_names_a_rank_left_behind_but_not_a_group_that_waits():
    from distrib.protocol import Position
    from distrib.stall import StallWatch

    watch = StallWatch(3, limit_s=3.0, now=0.0)
    for rank, phase in enumerate(["data", "backward", "backward"]):
        watch.update(rank, Position(4, phase), now=1.0)
    assert watch.stalled(now=2.9) == []  # still within the limit, counted from the watch's start
    assert watch.stalled(now=3.0) == [(0, "at step 4 in data for 3.0 s")]  # peers are further on
    assert watch.front() == "rank 1 is at step 4 in backward"

    watch.update(0, Position(4, "forward"), now=3.5)  # it moved: the clock starts again
    assert watch.stalled(now=6.0) == []
    assert [rank for rank, _ in watch.stalled(now=6.5)] == [0]

    waiting = StallWatch(2, limit_s=3.0, now=0.0)  # everyone in the same place: the hang limit's case
    for rank in range(2):
        waiting.update(rank, Position(7, "eval"), now=1.0)
    assert waiting.stalled(now=60.0) == []

    silent = StallWatch(2, limit_s=3.0, now=0.0)  # a rank that never answers while its peer does
    silent.update(1, Position(2, "backward"), now=1.0)
    assert silent.stalled(now=3.5) == [(0, "silent for 3.5 s")]


def test_drain_watch_stop_waits_for_a_poll_in_flight(monkeypatch):
    """A poll still inside Ray when the driver shuts Ray down can crash the process (ray#31145),
    so stop() returns only once the polling thread has ended."""
    import threading

    from distrib import cluster

    polling, release = threading.Event(), threading.Event()

    def slow_poll() -> dict[str, int]:
        polling.set()
        release.wait(5)
        return {"node-a": 0, "node-b": 0}

    monkeypatch.setattr(cluster, "DRAIN_POLL_S", 0.01)
    monkeypatch.setattr(cluster, "draining_nodes", slow_poll)
    watch = cluster.DrainWatch(lambda: {"node-a"})
    watch.start()
    assert polling.wait(5)
    threading.Timer(0.3, release.set).start()  # the poll returns 0.3 s after stop() is called
    watch.stop()
    assert not [t for t in threading.enumerate() if t.name == "drain-watch"]
    assert watch.draining == {"node-a": 0}  # the poll in flight finished and was kept
    watch.stop()  # twice is fine


def test_the_driver_imports_no_torch():
    """The driver never touches a tensor's maths, so a driver of simulated replicas, or one on a
    machine without torch's ~1 s import, loads none, not even when a real replica's snapshot
    (a HostState) arrives: it is serialised on the checkpoint writer's thread, which imports
    torch then."""
    import pickle
    import subprocess
    import sys

    from distrib.hostcopy import HostSnapshots

    snapshots = HostSnapshots(torch.device("cpu"))
    snapshots.begin({"model": {"weight": torch.ones(3, 4).t(), "half": torch.ones(2, dtype=torch.bfloat16)}}, key=1)
    taken = pickle.dumps(snapshots.take(1))
    code = ("import pickle, sys, distrib.cli, distrib.driver, distrib.rundir; "
            "state = pickle.loads(sys.stdin.buffer.read()); print(len(state.data), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], input=taken, capture_output=True, timeout=120)
    assert done.stdout.decode().split() == ["68", "False"], done.stderr.decode()  # 48 bytes, then 4 at 64


def test_a_loader_process_error_is_named_by_its_own_last_line():
    """torch re-raises an error of a DataLoader worker as 'Caught E in DataLoader worker process N.'
    and puts the error's own text (the file, the fix) last: that text is what the run reports."""
    from distrib import blame

    class Unreadable(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index):
            raise ValueError("decoder: torchvision cannot read '/data/cat/a.jpg'; fix it, or set decoder: pil")

    with pytest.raises(ValueError) as err:
        next(iter(torch.utils.data.DataLoader(Unreadable(), num_workers=1)))
    assert str(err.value).startswith("Caught ValueError in DataLoader worker process 0.")
    assert blame.cause_of(err.value) == ("ValueError: decoder: torchvision cannot read '/data/cat/a.jpg'; "
                                         "fix it, or set decoder: pil")


def test_where_auto_picks_nccl_min_workers_has_no_effect():
    from distrib import comm

    on_gpus = comm.resolve_config(RunConfig(num_workers=4, min_workers=2), cluster_gpus=8)
    assert (on_gpus.backend, on_gpus.min_workers) == ("nccl", 0)
    on_cpus = comm.resolve_config(RunConfig(num_workers=4, min_workers=2), cluster_gpus=0)
    assert (on_cpus.backend, on_cpus.min_workers) == ("gloo", 2)


def test_files_beside_the_class_folders_are_not_checked(tmp_path):
    """ImageFolder reads only the class folders: a preview.bmp at the root is never decoded."""
    from distrib import folders

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_bytes(b"")
    (tmp_path / "preview.bmp").write_bytes(b"")
    folders.check(RunConfig(data="folder", data_dir=str(tmp_path), num_classes=2))
    (tmp_path / "cat" / "b.bmp").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"decoder: auto reads .* not '.*/cat/b.bmp'"):
        folders.check(RunConfig(data="folder", data_dir=str(tmp_path), num_classes=2))
