"""JPEG folders decoded in batches on the GPU with nvJPEG (`decoder: nvjpeg`).

The other decoders (data.ShardSource) decode and crop one image at a time in DataLoader
worker processes, about a thousand images/s per core. Here the CPU only reads files:

- files are read on threads (the reads release the GIL);
- one `torchvision.io.decode_jpeg` call decodes the whole shard, on the replica's device
  (nvJPEG's batched decode on cuda, libjpeg-turbo on cpu);
- each image is cropped (a view), converted and resized with antialiasing on the device,
  then the batch is flipped and normalised at once;
- on cuda the next step's batch is made on a side stream by a background thread while the
  current step trains, and the step's stream waits for it only when it needs it.

The contract of data.py holds: the sample at stream position p is dataset image
perm_e[p % n], cropped and flipped with parameters drawn from a generator seeded with
`sample_seed(seed, p)`, in the order torchvision's RandomResizedCrop and
RandomHorizontalFlip draw them. So N workers equal 1 worker and a resumed run equals an
uninterrupted one, and the crops are those of the PIL path (the pixels differ a little:
another decoder and another resize kernel).
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torchvision
from torch.nn import functional
from torchvision.io import ImageReadMode

from distrib.config import RunConfig
from distrib.data import IMAGENET_MEAN, IMAGENET_STD, dataset_indices, sample_seed, shard_positions, split_held_out

JPEG_MAGIC = b"\xff\xd8\xff"
READ_THREADS = 8
"""File reads in flight per replica: reads wait on the disk, not the CPU."""
SCALE, LOG_RATIO = (0.08, 1.0), torch.log(torch.tensor((3 / 4, 4 / 3)))
"""RandomResizedCrop's defaults (area fraction; log of the aspect-ratio range, as float32)."""


def resized_crop_box(height: int, width: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop, drawn from `gen` exactly as torchvision's
    RandomResizedCrop draws from torch's global generator: up to 10 tries of a random area and
    aspect ratio, else the largest centred crop within the ratio range."""
    area = height * width
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*SCALE, generator=gen).item()
        aspect = torch.exp(torch.empty(1).uniform_(LOG_RATIO[0], LOG_RATIO[1], generator=gen)).item()
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_params(*, seed: int, position: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) of the sample at `position`: the crop, then the flip's draw."""
    gen = torch.Generator().manual_seed(sample_seed(seed, position))
    box = resized_crop_box(height, width, gen)
    return (*box, bool(torch.rand(1, generator=gen).item() < 0.5))


def resize_centre_crop(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """eval_transform on a (1, 3, H, W) float image: the short side resized to 256/224 of the
    crop, then the centred square."""
    height, width = image.shape[-2:]
    short_to = image_size * 256 // 224
    long_to = int(short_to * max(height, width) / min(height, width))  # as torchvision's Resize rounds it
    size = (short_to, long_to) if height <= width else (long_to, short_to)
    resized = functional.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = int(round((size[0] - image_size) / 2)), int(round((size[1] - image_size) / 2))
    return resized[..., top:top + image_size, left:left + image_size]


class JpegShardSource:
    """Logical shard `shard` of each step's batch of a JPEG folder, on its device; `batch(step)`
    in any order (a step asked again or out of turn is made at once; the next one is prepared
    ahead on cuda)."""

    def __init__(self, cfg: RunConfig, *, shard: int, device: torch.device):
        self._cfg, self._shard, self._device = cfg, shard, device
        folder = torchvision.datasets.ImageFolder(cfg.data_dir, loader=str)  # paths only: nothing decoded
        samples = folder.samples
        if cfg.val_fraction:
            train, _ = split_held_out(folder.targets, fraction=cfg.val_fraction, seed=cfg.seed)
            samples = [samples[i] for i in train]
        self._samples = samples
        self._reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="jpeg-read")
        on_gpu = device.type == "cuda"
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="jpeg-ahead") if on_gpu else None
        self._stream = torch.cuda.Stream(device) if on_gpu else None
        self._pending: tuple[int, Future] | None = None
        scale = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self._inv_std = 1 / scale

    def close(self) -> None:
        """Wait for the batch being prepared, then stop the threads."""
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        if self._ahead is not None:
            self._ahead.shutdown(wait=True)
        self._reads.shutdown(wait=True)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == step:
            images, targets, ready = pending[1].result()
        else:
            if pending is not None:
                pending[1].result()  # not wanted, but it must not run beside this one
            images, targets, ready = self._prepare(step)
        if ready is not None:  # made on the side stream: the step's stream waits for it, and owns it
            current = torch.cuda.current_stream(self._device)
            current.wait_event(ready)
            images.record_stream(current)
            targets.record_stream(current)
        if self._ahead is not None and step + 1 < self._cfg.steps:
            self._pending = (step + 1, self._ahead.submit(self._prepare, step + 1))
        return images, targets

    def _prepare(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        cfg = self._cfg
        positions = shard_positions(step=step, shard=self._shard, batch_size_per_worker=cfg.batch_size_per_worker,
                                    global_batch_size=cfg.global_batch_size)
        indices = dataset_indices(positions, seed=cfg.seed, dataset_size=len(self._samples))
        paths = [self._samples[i][0] for i in indices]
        encoded = list(self._reads.map(_read_jpeg, paths))
        on_stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with on_stream:
            decoded = _decode(encoded, paths, self._device)
            images = self._augment(decoded, positions)
            targets = torch.tensor([self._samples[i][1] for i in indices]).to(self._device, non_blocking=True)
            ready = None
            if self._stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._stream)
        return images, targets, ready

    def _augment(self, decoded: list[torch.Tensor], positions: range) -> torch.Tensor:
        """Crop, resize, flip and normalise: (B, 3, S, S) float32 on the device."""
        cfg, size = self._cfg, self._cfg.image_size
        crops, flips = [], []
        for image, position in zip(decoded, positions):
            height, width = image.shape[-2:]
            if cfg.augment != "standard":
                crops.append(resize_centre_crop(image[None].float(), size))
                flips.append(False)
                continue
            top, left, h, w, flip = augment_params(seed=cfg.seed, position=position, height=height, width=width)
            crop = image[None, :, top:top + h, left:left + w].float()
            crops.append(functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False))
            flips.append(flip)
        batch = torch.cat(crops)
        if any(flips):
            mask = torch.tensor(flips).to(self._device, non_blocking=True).view(-1, 1, 1, 1)
            batch = torch.where(mask, batch.flip(-1), batch)
        return (batch.clamp_(0, 255) - self._mean) * self._inv_std


def _read_jpeg(path: str) -> torch.Tensor:
    with open(path, "rb") as file:
        data = file.read()
    if not data.startswith(JPEG_MAGIC):
        raise ValueError(f"{path} is not a JPEG file (decoder: nvjpeg reads JPEG only); "
                         "convert it, remove it, or set decoder: pil")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode(encoded: list[torch.Tensor], paths: list[str], device: torch.device) -> list[torch.Tensor]:
    """Decode a batch as RGB (on cpu too, for tests); on failure, name the first file that does not decode alone."""
    try:
        return torchvision.io.decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        for data, path in zip(encoded, paths):
            try:
                torchvision.io.decode_jpeg(data, mode=ImageReadMode.RGB)
            except RuntimeError as one:
                raise ValueError(f"{path} cannot be decoded ({str(one).strip().splitlines()[0]}); "
                                 "remove or re-encode it") from None
        raise err
