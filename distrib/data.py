"""Each step's global batch, as a function of (seed, step) only, and each rank's slice of it.

Sample i of step s is the same whatever the number of workers, for the same
global batch size: that is what makes N workers equal 1 worker on the same
global batch, and a resumed run equal to an uninterrupted one.

- synthetic: the tutorial's data. The whole global batch comes from one
  generator seeded with `step_seed(seed, step)` (images first, then targets),
  on the replica's device, and rank r keeps rows [r*b, (r+1)*b). Making the
  whole batch costs W times one shard, which is cheap next to a resnet18 step
  and keeps the contract obvious.
- fake / folder: position p = step * G + j of the sample stream maps to
  index perm_e[p % n] of the dataset, where perm_e is a permutation seeded by
  (seed, epoch e = p // n). Each rank loads only its own rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torchvision
from torchvision.transforms import v2

from distrib.config import RunConfig

# ImageNet's channel statistics, which torchvision's pretrained resnet18 expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def step_seed(seed: int, step: int) -> int:
    """One generator seed per (seed, step); injective for seed < 2**31 and step < 2**32."""
    return seed * 2**32 + step


def synthetic_global_batch(*, seed: int, step: int, global_batch_size: int, image_size: int,
                           num_classes: int, loss: str, device: torch.device | str = "cpu"
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tutorial's data for one step: images uniform in [0, 1), then targets.

    Targets are class indices for cross_entropy and uniform (B, num_classes) rows for the sum loss.
    """
    gen = torch.Generator(device=device).manual_seed(step_seed(seed, step))
    images = torch.rand(global_batch_size, 3, image_size, image_size, generator=gen, device=device)
    if loss == "sum":
        targets = torch.rand(global_batch_size, num_classes, generator=gen, device=device)
    else:
        targets = torch.randint(0, num_classes, (global_batch_size,), generator=gen, device=device)
    return images, targets


def shard_rows(world_rank: int, batch_size_per_worker: int) -> slice:
    """The rows of the global batch that belong to `world_rank`."""
    return slice(world_rank * batch_size_per_worker, (world_rank + 1) * batch_size_per_worker)


def shard_positions(*, step: int, world_rank: int, batch_size_per_worker: int, global_batch_size: int) -> range:
    """Positions in the endless sample stream that `world_rank` trains on at `step`."""
    start = step * global_batch_size + world_rank * batch_size_per_worker
    return range(start, start + batch_size_per_worker)


def dataset_indices(positions: range, *, seed: int, dataset_size: int) -> list[int]:
    """Dataset indices for stream positions: a fresh seeded permutation each epoch."""
    indices, perm, perm_epoch = [], None, -1
    for position in positions:
        epoch = position // dataset_size
        if epoch != perm_epoch:
            gen = torch.Generator().manual_seed(step_seed(seed, epoch))
            perm, perm_epoch = torch.randperm(dataset_size, generator=gen), epoch
        indices.append(int(perm[position % dataset_size]))
    return indices


def build_dataset(cfg: RunConfig) -> torch.utils.data.Dataset:
    """The map-style dataset for data: fake | folder, yielding (image tensor, class index)."""
    if cfg.data == "fake":
        return torchvision.datasets.FakeData(
            size=cfg.dataset_size, image_size=(3, cfg.image_size, cfg.image_size),
            num_classes=cfg.num_classes,
            transform=v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]),
            random_offset=cfg.seed)
    if cfg.data == "folder":
        # The standard evaluation-style pipeline: resize the short side (256/224 of the crop), centre-crop.
        return torchvision.datasets.ImageFolder(cfg.data_dir, transform=v2.Compose([
            v2.PILToTensor(),
            v2.Resize(cfg.image_size * 256 // 224, antialias=True),
            v2.CenterCrop(cfg.image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]))
    raise ValueError(f"no dataset for data: {cfg.data}")


class _StepBatches(torch.utils.data.Sampler):
    """Yields this rank's index list for step, step + 1, ... (a batch sampler for DataLoader)."""

    def __init__(self, cfg: RunConfig, *, world_rank: int, first_step: int, dataset_size: int):
        self._cfg, self._rank, self._first, self._size = cfg, world_rank, first_step, dataset_size

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self._first, self._cfg.steps):
            positions = shard_positions(step=step, world_rank=self._rank,
                                        batch_size_per_worker=self._cfg.batch_size_per_worker,
                                        global_batch_size=self._cfg.global_batch_size)
            yield dataset_indices(positions, seed=self._cfg.seed, dataset_size=self._size)

    def __len__(self) -> int:
        return max(0, self._cfg.steps - self._first)


class ShardSource:
    """This rank's batches, on its device: `batch(step)` must be asked for steps in order,
    except that a jump (a resume) restarts the loader at the new step."""

    def __init__(self, cfg: RunConfig, *, world_rank: int, device: torch.device):
        self._cfg, self._rank, self._device = cfg, world_rank, device
        self._rows = shard_rows(world_rank, cfg.batch_size_per_worker)
        self._dataset = None if cfg.data == "synthetic" else build_dataset(cfg)
        self._loader: Iterator | None = None
        self._next_step = -1

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self._cfg
        if self._dataset is None:
            images, targets = synthetic_global_batch(
                seed=cfg.seed, step=step, global_batch_size=cfg.global_batch_size, image_size=cfg.image_size,
                num_classes=cfg.num_classes, loss=cfg.loss, device=self._device)
            return images[self._rows], targets[self._rows]
        if step != self._next_step:
            self._loader = iter(torch.utils.data.DataLoader(
                self._dataset,
                batch_sampler=_StepBatches(cfg, world_rank=self._rank, first_step=step,
                                           dataset_size=len(self._dataset)),
                num_workers=cfg.loader_workers, pin_memory=self._device.type == "cuda",
                persistent_workers=False))
        self._next_step = step + 1
        images, targets = next(self._loader)
        return (images.to(self._device, non_blocking=True), targets.to(self._device, non_blocking=True))
