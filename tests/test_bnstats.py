"""bnstats on real gloo groups of 2 and 3 processes: the mean every rank sees, what `adopt`
changes, the rows a snapshot carries and `give_back`, a shrunk group's weights; and the
Trainer's rule for when ranks adopt the mean."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distrib import RunConfig, bnstats, comm
from distrib.comm import free_port
from distrib.protocol import shards_of

SIZES = [(1000,), (20, 10)]


def rank_buffers(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return [torch.randn(size, generator=generator) * (rank + 1) for size in SIZES]


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    out = {}
    buffers = rank_buffers(rank)
    kept = bnstats.observe(buffers, step=5, num_shards=1, num_workers=world_size, adopt=False)
    out["kept_mean"], out["kept_own"] = kept.mean, kept.own
    out["untouched"] = [b.clone() for b in buffers]
    adopted = bnstats.observe(buffers, step=5, num_shards=1, num_workers=world_size, adopt=True)
    out["adopted_own"], out["after_adopt"] = adopted.own, [b.clone() for b in buffers]
    again = bnstats.observe(buffers, step=5, num_shards=1, num_workers=world_size, adopt=True)
    out["again_mean"], out["after_again"] = again.mean, [b.clone() for b in buffers]
    bnstats.give_back(buffers, kept.own, rank)
    out["given_back"] = buffers
    # Shrunk: num_workers one more than the group; rank 0 trains two shards.
    shrunk = rank_buffers(rank)
    observed = bnstats.observe(shrunk, step=5, num_shards=2 if rank == 0 else 1, num_workers=world_size + 1,
                               adopt=True)
    out["shrunk_own"], out["shrunk"] = observed.own, [b.clone() for b in shrunk]
    bnstats.observe(shrunk, step=5, num_shards=2 if rank == 0 else 1, num_workers=world_size + 1, adopt=True)
    out["shrunk_again"] = shrunk
    torch.save(out, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def results(request, tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp(f"bnstats{request.param}")
    mp.spawn(worker, args=(request.param, free_port(), str(out_dir)), nprocs=request.param)
    return [torch.load(out_dir / f"{rank}.pt") for rank in range(request.param)]


def test_the_mean_is_the_same_bits_everywhere_and_nothing_changes_unless_adopted(results):
    world_size = len(results)
    expected = [sum(rank_buffers(r)[i] for r in range(world_size)) / world_size for i in range(len(SIZES))]
    for rank, out in enumerate(results):
        for mean, want in zip(out["kept_mean"], expected):
            torch.testing.assert_close(mean, want, rtol=1e-6, atol=1e-6)
            assert torch.equal(mean, results[0]["kept_mean"][SIZES.index(tuple(mean.shape))])
        assert all(torch.equal(b, own) for b, own in zip(out["untouched"], rank_buffers(rank)))
        assert all(torch.equal(b, m) for b, m in zip(out["after_adopt"], out["kept_mean"]))
        assert out["adopted_own"] is None


def test_rows_carry_every_rank_own_and_give_back_restores_them(results):
    for rank, out in enumerate(results):
        assert out["kept_own"].shape == (len(results), sum(torch.Size(s).numel() for s in SIZES))
        assert all(torch.equal(b, own) for b, own in zip(out["given_back"], rank_buffers(rank)))


def test_observing_ranks_that_agree_changes_no_bit(results):
    """After adopting, every rank holds the same bits; taking their mean again (a sum and a
    division) would round some of 1,200 random values differently on 3 ranks, and in a shrunk
    group, weighted 2 and 1: it must not."""
    for out in results:
        assert all(torch.equal(a, b) for a, b in zip(out["after_again"], out["after_adopt"]))
        assert all(torch.equal(a, b) for a, b in zip(out["shrunk_again"], out["shrunk"]))
        assert all(torch.equal(a, b) for a, b in zip(out["again_mean"], out["after_adopt"]))


def test_a_shrunk_group_weighs_each_rank_by_its_shards(results):
    world_size = len(results)
    weights = [2] + [1] * (world_size - 1)
    expected = [sum(w * rank_buffers(r)[i] for r, w in enumerate(weights)) / (world_size + 1)
                for i in range(len(SIZES))]
    for out in results:
        assert out["shrunk_own"] is None
        for got, want in zip(out["shrunk"], expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---- the Trainer's rule: off the check cadence, a full group keeps each rank's own ----------------
def trainer_worker(rank: int, world_size: int, num_workers: int, port: int, out_dir: str) -> None:
    import io

    from distrib.trainer import Trainer

    cfg = RunConfig(num_workers=num_workers, device="cpu", batch_size_per_worker=4, image_size=32, num_classes=10,
                    steps=8, check_every=4, checkpoint_every=4, loader_workers=0)
    trainer = Trainer(cfg, weights=None)
    comm.init_process_group(backend="gloo", master_addr="127.0.0.1", master_port=port, world_rank=rank,
                            world_size=world_size, timeout_s=60)
    trainer.join(world_rank=rank, shards=shards_of(num_workers, world_size)[rank], faults=None)
    trainer.run_steps(0, 1)
    trainer.fingerprint()  # after 1 step: not a check of the run's own
    snapshot = torch.load(io.BytesIO(trainer.snapshot()), weights_only=True)
    live = torch.cat([b.reshape(-1) for b in trainer.model.buffers() if b.is_floating_point()])
    torch.save({"live": live, "rows": snapshot.get("rank_buffers")}, f"{out_dir}/{rank}.pt")
    comm.leave_process_group()


@pytest.mark.parametrize("num_workers", [2, 3], ids=["full group", "shrunk group"])
def test_off_the_cadence_a_full_group_keeps_its_own_and_a_shrunk_one_adopts(tmp_path, num_workers):
    """Two ranks, one step, then a fingerprint at a step the run does not check. At full size
    each rank keeps its own running statistics and the snapshot carries them all; a group
    shrunk below num_workers (one rank training two shards) takes the weighted mean, which a
    grow back needs, and carries no rows."""
    mp.spawn(trainer_worker, args=(2, num_workers, free_port(), str(tmp_path)), nprocs=2)
    out = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    if num_workers == 2:
        assert not torch.equal(out[0]["live"], out[1]["live"])
        assert all(torch.equal(o["rows"], torch.stack([out[0]["live"], out[1]["live"]])) for o in out)
    else:
        assert torch.equal(out[0]["live"], out[1]["live"])
        assert out[0]["rows"] is None and out[1]["rows"] is None
