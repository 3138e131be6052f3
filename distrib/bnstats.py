"""BatchNorm running statistics under `batchnorm: train`: each rank's own, reconciled where observed.

Under `train` each rank updates its running statistics from its own shard, and forward never
reads them, so ranks need not agree while they train. Where they are observed (a fingerprint,
saved state, an evaluation) `observe` gathers every rank's floating-point buffers (one
all-gather; 38 KB a rank for resnet18) and takes their mean over the global batch's shards:
the same bits on every rank, which fingerprints check and saved models hold.

Whether the ranks then keep the mean as their own depends only on the step and the group
(`adopt`: cadence.averages_buffers, or a group shrunk below num_workers): at the run's own
checks and checkpoints they do, so a lost rank's statistics are made up at the next one.
Anywhere else at full size (a stop's checkpoint, a move off a drained node, a state read, the
check after a heal) they keep their own, and a snapshot taken there carries every rank's own
("rank_buffers") for `give_back` at a restore. A full-size run stopped and resumed at any step
thus goes on bit-identical to one that was not stopped, and extra observations change no
number of the run. (A shrunk group always adopts: each of its ranks holds the mean over
several shards, so there is no per-shard state to keep, and growing back needs the mean.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from distrib.digest import raw_bits


@dataclass(frozen=True)
class Observed:
    """The ranks' floating-point buffers as gathered after `step` steps."""

    step: int
    mean: list[torch.Tensor]
    """Their mean over the global batch's shards, one tensor per buffer: the same bits on every rank."""
    own: torch.Tensor | None
    """Every rank's own, one row per rank, where the ranks kept them (not adopted) and the group
    is at full size; None otherwise."""


def observe(buffers: list[torch.Tensor], *, step: int, num_shards: int, num_workers: int,
            adopt: bool) -> Observed:
    """Gather `buffers` from every rank of the default group and take their mean (`adopt`: and
    make it every rank's own). Collective: all ranks call it, with the same `adopt`.

    `num_shards`: the logical shards this rank trains on (more than one in a group shrunk below
    `num_workers`), whose mean its buffers hold; each rank is weighed by its number. Where every
    rank holds the same bits the mean is those bits, so observing twice at a step changes nothing.
    """
    flat = torch.cat([b.reshape(-1) for b in buffers])
    message = torch.cat([flat, flat.new_full((1,), float(num_shards))])  # and how many shards it stands for
    rows = [torch.empty_like(message) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, message)
    gathered = torch.stack(rows)
    own, shards = gathered[:, :-1], gathered[:, -1:]
    bits = raw_bits(own).view(own.shape)  # not ==, for which -0.0 and 0.0 are the same
    same = bool((bits == bits[0]).all())
    mean_flat = own[0] if same else (own * shards).sum(0).div_(num_workers)
    mean = [m.view_as(b) for m, b in zip(mean_flat.split([b.numel() for b in buffers]), buffers)]
    if adopt and not same:
        torch._foreach_copy_(buffers, mean)
    keep_own = len(rows) == num_workers and not adopt and not same
    return Observed(step=step, mean=mean, own=own.contiguous() if keep_own else None)


def give_back(buffers: list[torch.Tensor], own: torch.Tensor | None, world_rank: int | None) -> None:
    """Restore this rank's own buffers from a snapshot's `own` rows (Observed.own), when it has
    them and the rank is one of a full-size group (`world_rank` not None); else leave `buffers`
    as the snapshot's model set them (the mean)."""
    if own is None or world_rank is None:
        return
    row = own[world_rank].to(buffers[0].device)
    torch._foreach_copy_(buffers, [part.view_as(b) for part, b in zip(row.split([b.numel() for b in buffers]),
                                                                       buffers)])
