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
- augmentation (folder data, `augment: standard`): the random-resized crop and flip of
  the sample at position p draw from torch's RNG seeded with `sample_seed(seed, p)`,
  so a sample is augmented the same way whatever the rank, loader worker or restart.
  This is the contract any other input pipeline must keep.
- decoding (fake, folder): loader worker processes decode (`decoder: pil` or `torchvision`),
  crop and flip in uint8; a batch crosses to the replica as uint8 (a quarter of the float
  bytes) and is scaled and normalised on its device. `decoder: nvjpeg` decodes on the GPU
  instead (distrib/jpeg.py), under the same contract.
- held-out set: val_dir, or the val_fraction of each class of data_dir (a split
  seeded by `seed`), or for synthetic and fake data eval_size samples from a stream
  training never reaches. Rank r of W evaluates the r-th of W contiguous slices.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.transforms import v2

from distrib.config import RunConfig
from distrib.folders import held_out_count

# ImageNet's channel statistics, which torchvision's pretrained resnet18 expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def step_seed(seed: int, step: int) -> int:
    """One generator seed per (seed, step); injective for seed < 2**31 and step < 2**32."""
    return seed * 2**32 + step


HELD_OUT_STREAM = 2**31
"""Synthetic held-out sample i is drawn like training step HELD_OUT_STREAM + i (runs stay below)."""


def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of the sample at `position` of the stream (position = step x G + j)."""
    return (seed * 2**40 + position) % 2**63


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


def shard_rows(shard: int, batch_size_per_worker: int) -> slice:
    """The rows of the global batch in logical shard `shard` (rank r's shard at full size)."""
    return slice(shard * batch_size_per_worker, (shard + 1) * batch_size_per_worker)


def shard_positions(*, step: int, shard: int, batch_size_per_worker: int, global_batch_size: int) -> range:
    """Positions in the endless sample stream of logical shard `shard` at `step`."""
    start = step * global_batch_size + shard * batch_size_per_worker
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


def eval_transform(image_size: int, *, normalize: bool = True) -> v2.Transform:
    """Evaluation of a PIL image, as an exported model's users run it: resize the short side to
    256/224 of the crop, centre-crop, scale to [0, 1] (and normalise)."""
    steps = [v2.PILToTensor(), resize_crop(image_size), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps + ([v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize else []))


def resize_crop(image_size: int) -> v2.Transform:
    """augment: none and evaluation, on uint8 images: the short side to 256/224 of the crop, centre-crop."""
    return v2.Compose([v2.Resize(image_size * 256 // 224, antialias=True), v2.CenterCrop(image_size)])


def train_augment(image_size: int) -> v2.Transform:
    """The standard training recipe, on uint8 images: random-resized crop (scale 0.08-1), horizontal flip."""
    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])


def to_input(images: torch.Tensor, *, normalize: bool) -> torch.Tensor:
    """A uint8 batch as the model's float input: scaled to [0, 1], then (folder data) normalised
    with ImageNet's statistics. Done on the replica's device, after the uint8 batch (a quarter
    of the float bytes) has crossed from the loader processes."""
    images = v2.functional.to_dtype(images, torch.float32, scale=True)
    return v2.functional.normalize(images, IMAGENET_MEAN, IMAGENET_STD) if normalize else images


def pil_rgb(path: str) -> torch.Tensor:
    """decoder: pil. Any format PIL reads, as a (3, H, W) uint8 tensor; a file it cannot decode
    (truncated, corrupt, not an image) is named."""
    try:
        with open(path, "rb") as file:
            return v2.functional.pil_to_tensor(Image.open(file).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path} cannot be decoded by PIL ({_first_line(err)}); re-encode or remove it") from None


def torchvision_rgb(path: str) -> torch.Tensor:
    """decoder: torchvision. JPEG (libjpeg-turbo: the pixels PIL gives, in half the time), PNG
    or WebP, as a (3, H, W) uint8 tensor; a file it cannot decode is named. A 16-bit PNG, which
    torchvision decodes to uint16, is scaled to 8 bits (its high byte; PIL would clip a 16-bit
    grayscale PNG to white instead)."""
    try:
        image = torchvision.io.decode_image(torchvision.io.read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise ValueError(f"{path} cannot be decoded by torchvision ({_first_line(err)}); re-encode or remove it, "
                         "or set decoder: pil") from None
    return image if image.dtype == torch.uint8 else v2.functional.to_dtype(image, torch.uint8, scale=True)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _fake(cfg: RunConfig, *, size: int, offset: int) -> torchvision.datasets.FakeData:
    return torchvision.datasets.FakeData(
        size=size, image_size=(3, cfg.image_size, cfg.image_size), num_classes=cfg.num_classes,
        transform=v2.PILToTensor(), random_offset=offset)


def _folder(cfg: RunConfig, root: str, transform=None) -> torchvision.datasets.ImageFolder:
    loader = pil_rgb if cfg.decoder == "pil" else torchvision_rgb
    return torchvision.datasets.ImageFolder(root, loader=loader, transform=transform)


def split_held_out(targets: list[int], *, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) indices: held_out_count of each class's indices, chosen by a
    permutation seeded by (seed, class), so every replica and every run splits alike."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    train, held_out = [], []
    for target, indices in sorted(by_class.items()):
        shuffled = list(indices)
        random.Random(seed * 100_003 + target).shuffle(shuffled)
        count = held_out_count(len(indices), fraction)
        held_out += shuffled[:count]
        train += shuffled[count:]
    return sorted(train), sorted(held_out)


class _Augmented(torch.utils.data.Dataset):
    """Items are (index, position): the dataset's image `index`, transformed (unless `transform`
    is None) with torch's RNG seeded by (seed, position) when `seeded`, so augmentation
    depends on nothing else."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform, *, seed: int, seeded: bool):
        self._dataset, self._transform, self._seed, self._seeded = dataset, transform, seed, seeded

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, position = item
        image, target = self._dataset[index]
        if self._transform is None:  # None, not a lambda: loader processes started by spawn pickle this
            return image, target
        if not self._seeded:
            return self._transform(image), target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self._seed, position))
            return self._transform(image), target


def training_dataset(cfg: RunConfig) -> torch.utils.data.Dataset:
    """The map-style dataset for data: fake | folder; items (index, position) -> (image, class)."""
    if cfg.data == "fake":
        return _Augmented(_fake(cfg, size=cfg.dataset_size, offset=cfg.seed), None, seed=cfg.seed, seeded=False)
    if cfg.data != "folder":
        raise ValueError(f"no dataset for data: {cfg.data}")
    folder = _folder(cfg, cfg.data_dir)
    if cfg.val_fraction:
        train, _ = split_held_out(folder.targets, fraction=cfg.val_fraction, seed=cfg.seed)
        folder = torch.utils.data.Subset(folder, train)
    standard = cfg.augment == "standard"
    transform = train_augment(cfg.image_size) if standard else resize_crop(cfg.image_size)
    return _Augmented(folder, transform, seed=cfg.seed, seeded=standard)


def held_out_dataset(cfg: RunConfig) -> torch.utils.data.Dataset:
    """The held-out set (fake or folder data) of plain (uint8 image, class) items."""
    if cfg.data == "fake":  # FakeData draws image i from seed i + offset: past the training ones
        return _fake(cfg, size=cfg.eval_size, offset=cfg.seed + cfg.dataset_size)
    if cfg.val_dir:
        return _folder(cfg, cfg.val_dir, resize_crop(cfg.image_size))
    folder = _folder(cfg, cfg.data_dir, resize_crop(cfg.image_size))
    _, held_out = split_held_out(folder.targets, fraction=cfg.val_fraction, seed=cfg.seed)
    return torch.utils.data.Subset(folder, held_out)


def eval_slice(size: int, *, world_rank: int, world_size: int) -> range:
    """The held-out indices rank `world_rank` evaluates: the r-th of W contiguous slices."""
    per_rank = math.ceil(size / world_size)
    return range(min(size, world_rank * per_rank), min(size, (world_rank + 1) * per_rank))


class _StepBatches(torch.utils.data.Sampler):
    """Yields this rank's (index, position) list for step, step + 1, ... (a batch sampler for DataLoader)."""

    def __init__(self, cfg: RunConfig, *, shard: int, first_step: int, dataset_size: int):
        self._cfg, self._shard, self._first, self._size = cfg, shard, first_step, dataset_size

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self._first, self._cfg.steps):
            positions = shard_positions(step=step, shard=self._shard,
                                        batch_size_per_worker=self._cfg.batch_size_per_worker,
                                        global_batch_size=self._cfg.global_batch_size)
            yield list(zip(dataset_indices(positions, seed=self._cfg.seed, dataset_size=self._size), positions))

    def __len__(self) -> int:
        return max(0, self._cfg.steps - self._first)


class ShardSource:
    """Logical shard `shard` of each step's batch (what rank `shard` trains on at full size), on
    its device: `batch(step)` must be asked for steps in order, except that a jump (a resume)
    restarts the loader at the new step."""

    def __init__(self, cfg: RunConfig, *, shard: int, device: torch.device):
        self._cfg, self._shard, self._device = cfg, shard, device
        self._rows = shard_rows(shard, cfg.batch_size_per_worker)
        self._dataset = None if cfg.data == "synthetic" else training_dataset(cfg)
        self._loader: Iterator | None = None
        self._next_step = -1

    def close(self) -> None:
        """Stop the loader's worker processes (dropping the iterator joins them)."""
        self._loader = None
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
                batch_sampler=_StepBatches(cfg, shard=self._shard, first_step=step,
                                           dataset_size=len(self._dataset)),
                num_workers=cfg.loader_workers, pin_memory=self._device.type == "cuda",
                persistent_workers=False))
        self._next_step = step + 1
        images, targets = next(self._loader)
        images = to_input(images.to(self._device, non_blocking=True), normalize=cfg.data == "folder")
        return images, targets.to(self._device, non_blocking=True)


EVAL_IN_PROCESS_MAX = 1024
"""Held-out images per rank up to which they are decoded in the replica's own process."""


class HeldOutSource:
    """This rank's slice of the held-out set, in batches on its device (built when first used)."""

    def __init__(self, cfg: RunConfig, *, world_rank: int, world_size: int, device: torch.device):
        self._cfg, self._device = cfg, device
        dataset = None if cfg.data == "synthetic" else held_out_dataset(cfg)
        size = cfg.eval_size if dataset is None else len(dataset)
        self.indices = eval_slice(size, world_rank=world_rank, world_size=world_size)
        # Loader processes take longer to start than a small slice takes to decode in this one.
        workers = cfg.loader_workers if len(self.indices) > EVAL_IN_PROCESS_MAX else 0
        self._loader = None if dataset is None else torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, list(self.indices)), batch_size=cfg.batch_size_per_worker,
            num_workers=workers, pin_memory=device.type == "cuda")

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self._cfg
        size = cfg.batch_size_per_worker
        if self._loader is None:
            for start in range(0, len(self.indices), size):
                samples = [synthetic_global_batch(seed=cfg.seed, step=HELD_OUT_STREAM + i, global_batch_size=1,
                                                  image_size=cfg.image_size, num_classes=cfg.num_classes,
                                                  loss=cfg.loss, device=self._device)
                           for i in self.indices[start:start + size]]
                yield torch.cat([s[0] for s in samples]), torch.cat([s[1] for s in samples])
            return
        for images, targets in self._loader:
            images = to_input(images.to(self._device, non_blocking=True), normalize=cfg.data == "folder")
            yield images, targets.to(self._device, non_blocking=True)
