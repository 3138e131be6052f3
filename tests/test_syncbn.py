"""batchnorm: sync on real gloo process groups: one layer against BatchNorm2d on the global
batch, N workers against 1 worker through the Orchestrator, and the strict consistency check.

Layer tests spawn 2 or 3 processes that join a real gloo group on 127.0.0.1; the
training tests use real Ray actors (the ray_local fixture). Nothing is mocked.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distrib import DivergenceError, Orchestrator, RunConfig, syncbn
from distrib.comm import free_port
from tests.conftest import flat_state

CHANNELS = 5


class Case(NamedTuple):
    """One layer check: each rank's shard size, the spatial size, and how the layer is run."""

    name: str
    shard_sizes: tuple[int, ...]
    spatial: int = 4
    channels_last: bool = False
    offset: float = 0.0  # added to the inputs: large offsets test the variance's stability
    momentum: float | None = 0.1
    ddp: bool = False  # wrap the layer in DDP and scale the loss by the world size, as the Trainer does
    dtype: str = "float32"  # of the inputs; float64 parameters too, bfloat16 with float32 ones (autocast)


def global_inputs(case: Case) -> dict[str, torch.Tensor]:
    """The global batch, upstream gradient, layer parameters and starting running stats; the
    same on every process (seeded)."""
    gen = torch.Generator().manual_seed(7)
    batch, size, dtype = sum(case.shard_sizes), case.spatial, getattr(torch, case.dtype)
    return {
        "x": (torch.randn(batch, CHANNELS, size, size, generator=gen) * 3 + case.offset).to(dtype),
        "grad_out": torch.randn(batch, CHANNELS, size, size, generator=gen).to(dtype),
        "weight": torch.rand(CHANNELS, generator=gen) + 0.5,
        "bias": torch.randn(CHANNELS, generator=gen),
        "running_mean": torch.randn(CHANNELS, generator=gen),
        "running_var": torch.rand(CHANNELS, generator=gen) + 0.5,
    }


def make_layer(case: Case, inputs: dict, cls=torch.nn.BatchNorm2d) -> torch.nn.BatchNorm2d:
    layer = cls(CHANNELS, momentum=case.momentum, dtype=torch.float64 if case.dtype == "float64" else None)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(layer, name).copy_(inputs[name])
    return layer.to(memory_format=torch.channels_last) if case.channels_last else layer


def run_on_rank(case: Case, rank: int) -> dict[str, torch.Tensor]:
    """Forward and backward of this rank's shard through a converted layer; what it ends with."""
    inputs = global_inputs(case)
    start = sum(case.shard_sizes[:rank])
    rows = slice(start, start + case.shard_sizes[rank])
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    x = inputs["x"][rows].contiguous(memory_format=fmt).requires_grad_()
    layer = syncbn.convert(make_layer(case, inputs))
    assert isinstance(layer, syncbn.SyncBatchNorm2d)
    module = torch.nn.parallel.DistributedDataParallel(layer) if case.ddp else layer
    out = module(x)
    loss = (out * inputs["grad_out"][rows]).sum()
    (loss * dist.get_world_size() if case.ddp else loss).backward()
    return {"out": out.detach(), "grad_x": x.grad, "grad_weight": layer.weight.grad, "grad_bias": layer.bias.grad,
            "running_mean": layer.running_mean, "running_var": layer.running_var,
            "num_batches_tracked": layer.num_batches_tracked, "channels_last": torch.tensor(
                out.is_contiguous(memory_format=torch.channels_last))}


def layer_worker(rank: int, world_size: int, port: int, out_dir: str, cases: list[Case]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for case in cases:
            torch.save(run_on_rank(case, rank), Path(out_dir) / f"{case.name}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def reference(case: Case) -> dict[str, torch.Tensor]:
    """Plain BatchNorm2d, training mode, on the concatenated global batch."""
    inputs = global_inputs(case)
    layer = make_layer(case, inputs)
    x = inputs["x"].clone().requires_grad_()
    out = layer(x)
    (out * inputs["grad_out"]).sum().backward()
    return {"out": out.detach(), "grad_x": x.grad, "grad_weight": layer.weight.grad, "grad_bias": layer.bias.grad,
            "running_mean": layer.running_mean, "running_var": layer.running_var,
            "num_batches_tracked": layer.num_batches_tracked}


LAYER_CASES = {
    2: [Case("even", (4, 4)), Case("channels_last", (3, 3), channels_last=True),
        Case("batch_one", (1, 1)), Case("batch_one_1x1", (1, 1), spatial=1, momentum=None),
        Case("uneven", (1, 5)), Case("offset", (4, 4), offset=1000.0),
        Case("ddp", (3, 3), ddp=True), Case("ddp_channels_last", (2, 2), channels_last=True, ddp=True),
        Case("float64", (2, 3), dtype="float64", ddp=True), Case("bfloat16", (4, 4), dtype="bfloat16")],
}
"""Batch one at 1x1 is the hard edge: one value per channel on a rank (no local variance),
as in resnet18's last stage at 32 px with one image per worker. Two ranks: the statistics are
combined by one all-reduce of per-channel sums, the same code for any number of ranks (4 ranks
train a whole model in test_n_workers_equal_one_worker_with_sync_batchnorm); a spawn of 3 more
processes would cost ~12 CPU-seconds of torch imports."""


@pytest.fixture(scope="module")
def layer_results(tmp_path_factory) -> dict[tuple[int, str], list[dict]]:
    """Every case of LAYER_CASES run once on a real gloo group of its size (one spawn per size)."""
    results = {}
    for world_size, cases in LAYER_CASES.items():
        out_dir = tmp_path_factory.mktemp(f"syncbn-{world_size}")
        mp.spawn(layer_worker, args=(world_size, free_port(), str(out_dir), cases), nprocs=world_size)
        for case in cases:
            results[world_size, case.name] = [torch.load(out_dir / f"{case.name}-{r}.pt") for r in range(world_size)]
    return results


@pytest.mark.parametrize(("world_size", "case"), [(w, c) for w, cases in LAYER_CASES.items() for c in cases],
                         ids=lambda v: str(v) if isinstance(v, int) else v.name)
def test_layer_matches_batchnorm2d_on_the_global_batch(layer_results, world_size, case):
    """Outputs, grad_input, grad_weight, grad_bias and running stats of the synchronized layer on
    the shards equal BatchNorm2d's on the whole batch, to rounding: both compute the same
    quantities, summed in a different order. float32: rtol 1e-5 on values of order 1 (with
    the 1000 offset the inputs themselves carry float32 rounding of 6e-5, hence atol 1e-3
    there); float64: 1e-12, so the maths is exact; bfloat16 (autocast's inputs, float32
    parameters): 2e-2, bfloat16's own rounding (8 bits of mantissa)."""
    ranks, ref = layer_results[world_size, case.name], reference(case)
    close = {"float64": dict(rtol=1e-12, atol=1e-12), "bfloat16": dict(rtol=2e-2, atol=2e-2),
             "float32": dict(rtol=1e-5, atol=1e-3 if case.offset else 2e-5)}[case.dtype]
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), ref["out"], **close)
    # grad_input is the gradient of the sum of all ranks' losses; DDP's case scales each loss by W.
    scale = world_size if case.ddp else 1
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks]), ref["grad_x"] * scale, **close)
    if case.ddp:  # DDP averaged each rank's share: every rank holds the global gradient
        weight_grads, bias_grads = [r["grad_weight"] for r in ranks], [r["grad_bias"] for r in ranks]
    else:  # each rank holds its own share; they add up to the global gradient
        weight_grads = [sum(r["grad_weight"] for r in ranks)]
        bias_grads = [sum(r["grad_bias"] for r in ranks)]
    for grad in weight_grads:
        torch.testing.assert_close(grad, ref["grad_weight"], **close)
    for grad in bias_grads:
        torch.testing.assert_close(grad, ref["grad_bias"], **close)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(ranks[0][name], ref[name], rtol=1e-5,
                                   atol=1e-3 if case.dtype == "bfloat16" else 1e-6)
        for other in ranks[1:]:  # identical bits on every rank: no averaging needed, none hidden
            assert torch.equal(other[name], ranks[0][name]), name
    if case.channels_last:  # the layout is kept (a 1x1 tensor is both layouts at once)
        assert all(bool(r["channels_last"]) for r in ranks)


def test_without_a_group_it_is_batchnorm2d_bit_for_bit():
    """World size 1 (no process group here): the plain BatchNorm2d path, in train and eval mode."""
    case = Case("alone", (6,), channels_last=True)
    inputs = global_inputs(case)
    plain, synced = make_layer(case, inputs), syncbn.convert(make_layer(case, inputs))
    assert syncbn.group_size() == 1 and isinstance(synced, syncbn.SyncBatchNorm2d)
    for train in (True, False):
        plain.train(train), synced.train(train)
        x = inputs["x"].contiguous(memory_format=torch.channels_last)
        assert torch.equal(synced(x), plain(x))
    assert torch.equal(synced.running_var, plain.running_var)


def test_convert_keeps_the_same_tensors_and_keys():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    before = dict(model.state_dict(keep_vars=True))
    converted = syncbn.convert(model)
    layers = [m for m in converted.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert converted is model and len(layers) == 20
    assert all(isinstance(m, syncbn.SyncBatchNorm2d) for m in layers)
    after = converted.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


# ---- N workers against 1 worker, through the Orchestrator (real Ray actors, real gloo) ----------
GLOBAL_BATCH = 8


def one_step_cfg(tmp_path: Path, *, workers: int, loss: str, channels_last: bool, batchnorm: str = "sync"):
    return RunConfig(num_workers=workers, device="cpu", batch_size_per_worker=GLOBAL_BATCH // workers,
                     image_size=32, num_classes=10, steps=1, loss=loss, channels_last=channels_last,
                     batchnorm=batchnorm, lr=1e-4 if loss == "sum" else 0.05, check_every=1, loader_workers=0,
                     run_dir=str(tmp_path / f"w{workers}-{loss}-{channels_last}-{batchnorm}"))


def trained_one_step(cfg: RunConfig) -> tuple[dict, dict]:
    """(state before, state after) one step: parameters, momentum and BatchNorm buffers."""
    with Orchestrator(cfg, progress=False) as orch:
        start = flat_state(orch.state())
        orch.train()
        return start, flat_state(orch.state())


def worst_relative_gap(ours: dict, ref: dict) -> tuple[float, str]:
    """The largest max|ours - ref| / max|ref| over the tensors of `ref`, and that tensor's name."""
    assert ref.keys() <= ours.keys()
    gaps = {name: ((ours[name].double() - ref[name].double()).abs().max()
                   / ref[name].double().abs().max().clamp(min=1e-30)).item() for name in ref}
    name = max(gaps, key=gaps.get)
    return gaps[name], name


@pytest.fixture(scope="module")
def one_worker_states(tmp_path_factory):
    """1-worker runs (global batch 8) by (loss, channels_last), each run once for the module."""
    cache: dict[tuple[str, bool], tuple[dict, dict]] = {}

    def get(loss: str, channels_last: bool) -> tuple[dict, dict]:
        if (loss, channels_last) not in cache:
            cfg = one_step_cfg(tmp_path_factory.mktemp("one"), workers=1, loss=loss, channels_last=channels_last)
            cache[loss, channels_last] = trained_one_step(cfg)
        return cache[loss, channels_last]

    return get


TOLERANCE = 2e-4
"""Per tensor, max |N workers - 1 worker| <= TOLERANCE x max |1 worker|, after one step.

The two runs do the same maths and add it up in a different order: other oneDNN kernels
for other batch sizes, per-rank statistics combined over the group, gradients averaged
over ranks. BatchNorm backward with the few values per channel of resnet18's last stages
at 32 px (8 at 1x1) amplifies that rounding. Measured: 1.6e-5 to 2.6e-5 of each tensor's
scale in these cases (the worst always a momentum buffer, i.e. a gradient), the order of
one process on the same batch in NCHW against NHWC (2.6e-5); 2e-4 leaves a margin of 8.
In float64 the same N-vs-1 comparison agrees to 8e-14, so the gap is float32 rounding,
not maths. `batchnorm: train` misses by orders of magnitude more (tested below)."""


@pytest.mark.usefixtures("ray_local")
# Each of 2 and 4 workers, each loss and each memory format, once (each case starts N
# replicas, ~10 CPU-seconds each): a shard, reduction or layout bug shows in the case it is in.
# 4 workers first: the 2 workers of the last case then serve the 2-worker tests below (keep_warm).
@pytest.mark.parametrize(("workers", "loss", "channels_last"), [(4, "sum", False), (2, "cross_entropy", True)])
def test_n_workers_equal_one_worker_with_sync_batchnorm(tmp_path, one_worker_states, workers, loss, channels_last):
    """N x (8 / N) images with batchnorm: sync == 1 x 8 images, after one step: parameters,
    momentum buffers and BatchNorm running statistics (see TOLERANCE)."""
    start, one = one_worker_states(loss, channels_last)
    _, ours = trained_one_step(one_step_cfg(tmp_path, workers=workers, loss=loss, channels_last=channels_last))
    gap, name = worst_relative_gap(ours, one)
    assert gap <= TOLERANCE, f"{name}: {gap:.2e} of its scale"
    assert any(k.startswith("momentum.") for k in one) and any("running_var" in k for k in one)
    for name in one:
        if "num_batches_tracked" in name:
            assert torch.equal(ours[name], one[name]), name
    # The momentum buffers hold the step's gradients (they start at 0), so the bound above is
    # on the update itself; the parameters moved far beyond it.
    params = {k: v for k, v in start.items() if k.startswith("model.") and "running" not in k
              and "num_batches" not in k}
    assert worst_relative_gap(one, params)[0] > 100 * TOLERANCE


@pytest.mark.usefixtures("ray_local")
def test_train_batchnorm_breaks_that_equality(tmp_path, one_worker_states):
    """The comparison above is sensitive: per-shard statistics (batchnorm: train) miss it."""
    _, one = one_worker_states("cross_entropy", True)
    _, ours = trained_one_step(one_step_cfg(tmp_path, workers=2, loss="cross_entropy", channels_last=True,
                                            batchnorm="train"))
    gap, _ = worst_relative_gap(ours, one)
    assert gap > 100 * TOLERANCE


def _nudge_one_running_mean(replica) -> None:
    """Move one element of this replica's first BatchNorm running mean by one float32 ulp."""
    def nudge(actor):
        running_mean = actor._trainer.model.bn1.running_mean
        running_mean[0] = torch.nextafter(running_mean[0], torch.tensor(float("inf")))

    ray.get(replica.__ray_call__.remote(nudge))


@pytest.mark.usefixtures("ray_local")
def test_one_image_per_worker_trains_and_a_one_ulp_buffer_divergence_is_caught_under_sync(small_cfg):
    """At 32 px resnet18's last stage is 1x1: one image per worker leaves one value per channel
    on each rank, where BatchNorm2d (batchnorm: train) refuses to train; the global batch has two.
    Under sync the buffers are then compared as they are (no averaging): one ulp on one rank is
    a divergence."""
    import math

    with Orchestrator(small_cfg.replace(batchnorm="sync", batch_size_per_worker=1, steps=2), progress=False) as orch:
        metrics = orch.train()
        assert orch.checks_passed >= 2  # start-up and the end: replicas identical, buffers unaveraged
        _nudge_one_running_mean(orch.replicas[1])
        with pytest.raises(DivergenceError, match=r"rank 1 \(node .*\) differs from rank 0, first in "
                                                  r"buffer:bn1\.running_mean"):
            orch.check_consistency()
    assert len(metrics) == 2 and all(math.isfinite(m.loss) for m in metrics)


@pytest.mark.usefixtures("ray_local")
def test_under_train_a_one_ulp_buffer_nudge_is_averaged_away(small_cfg):
    """Under train the ranks' running statistics are averaged before the check: the same nudge
    passes it (the test above, under sync, fails)."""
    with Orchestrator(small_cfg.replace(batchnorm="train", steps=1), progress=False) as orch:
        orch.train()
        _nudge_one_running_mean(orch.replicas[1])
        orch.check_consistency()


# ---- the NCCL path, on one GPU (skipped without CUDA) ------------------------------------------
GPU_CASES = [Case("cuda_fp32", (6,), channels_last=True), Case("cuda_bf16", (6,), dtype="bfloat16")]


def gpu_worker(rank: int, port: int, out_dir: str) -> None:
    """The synchronized function itself (not the layer, which is plain BatchNorm2d at world size 1)
    on a one-rank NCCL group: CUDA kernels, NCCL all-reduces, bf16 inputs."""
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        for case in GPU_CASES:
            inputs = {k: v.cuda() for k, v in global_inputs(case).items()}
            layer = make_layer(case, inputs).cuda()
            fmt = torch.channels_last if case.channels_last else torch.contiguous_format
            x = inputs["x"].contiguous(memory_format=fmt).requires_grad_()
            out = syncbn.SyncBatchNormFunction.apply(x, layer.weight, layer.bias, layer.running_mean,
                                                     layer.running_var, case.momentum, layer.eps, None)
            (out * inputs["grad_out"]).sum().backward()
            results = {"out": out, "grad_x": x.grad, "grad_weight": layer.weight.grad, "grad_bias": layer.bias.grad,
                       "running_mean": layer.running_mean, "running_var": layer.running_var}
            torch.save({k: v.detach().cpu() for k, v in results.items()}, Path(out_dir) / f"{case.name}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_nccl_path_matches_batchnorm2d(tmp_path):
    mp.spawn(gpu_worker, args=(free_port(), str(tmp_path)), nprocs=1)
    for case in GPU_CASES:
        ours, ref = torch.load(tmp_path / f"{case.name}.pt"), reference(case)
        tol = 2e-2 if case.dtype == "bfloat16" else 1e-4
        for name, value in ours.items():
            torch.testing.assert_close(value.to(ref[name].dtype), ref[name], rtol=tol, atol=tol, msg=name)


def test_sweeps_default_to_sync_unless_the_base_says(tmp_path):
    from distrib.scale import load_sweep

    for base, expected in (("{}", "sync"), ("{batchnorm: train}", "train"), ("{batchnorm: frozen}", "frozen")):
        path = tmp_path / "sweep.yaml"
        path.write_text(f"base: {base}\nsweep: {{num_workers: [1, 2]}}\n")
        assert load_sweep(path).base.batchnorm == expected
