"""JPEG folders decoded in batches on the GPU with nvJPEG (`decoder: nvjpeg`).

The other decoders (data.ShardSource) decode and crop one image at a time in DataLoader
worker processes, about a thousand images/s per core. Here the per-image work is split
by where it is cheapest:

- loader worker processes do everything that is per file and CPU-bound: read the files,
  take each image's size from its JPEG frame header, draw its crop and flip; a step's
  shard crosses to the replica as one byte buffer with offsets, boxes and flips;
- the replica decodes the shard in one `torchvision.io.decode_jpeg` call on its device
  (nvJPEG's batched decode on cuda, which torchvision runs on the hardware JPEG engines of an
  A100 or later for baseline JPEGs; libjpeg-turbo on cpu), gathers the crops onto one
  canvas, and resizes all of them in one `torchvision.ops.roi_align` call: output pixels
  sit where torchvision's resize puts them, each the mean of bilinear samples over its
  footprint (a box filter where torchvision's antialiasing uses a triangle: within about one
  8-bit level on average of the PIL path's pixels); then it flips and normalises the batch at once;
- on cuda the next step's batch is made on a side stream by a background thread while the
  current step trains, and the step's stream waits for it only when it needs it.

No kernel is launched per image: the replica's Python work, which competes with the
training step's own launches for the GIL, is a few microseconds an image.

The contract of data.py holds: the sample at stream position p is dataset image
perm_e[p % n], cropped and flipped with parameters drawn from a generator seeded with
`sample_seed(seed, p)`, in the order torchvision's RandomResizedCrop and
RandomHorizontalFlip draw them. A sample's pixels depend on nothing else: past its crop's
far edges the canvas holds a copy of the last row and column (what torchvision's resize
clamps to), whatever batch it is in. So N workers equal 1 worker and a resumed run equals an
uninterrupted one; the crops are those of the PIL path, the pixels differ a little (another
decoder and another resize filter).
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch
import torchvision
from torchvision.io import ImageReadMode
from torchvision.ops import roi_align

from distrib.config import RunConfig
from distrib.data import IMAGENET_MEAN, IMAGENET_STD, dataset_indices, sample_seed, shard_positions, split_held_out

JPEG_MAGIC = b"\xff\xd8\xff"
FRAME_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
"""JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they hold the size."""
SCALE, LOG_RATIO = (0.08, 1.0), torch.log(torch.tensor((3 / 4, 4 / 3)))
"""RandomResizedCrop's defaults (area fraction; log of the aspect-ratio range, as float32)."""
CANVAS_SIDE = 1024
"""Images up to this many pixels a side share one float32 canvas (B x 3 x 1025^2 at most: 3.2 GB at B = 256)."""
CANVAS_CHUNK = 64
"""Canvas slots filled per gather (its index: 64 x 3 x 501^2 x 8 bytes = 390 MB for ImageNet-sized crops)."""


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


def centre_crop_box(height: int, width: int, image_size: int) -> tuple[float, float, float, float]:
    """(top, left, h, w), in fractions of the image's pixels, of eval_transform's crop: the short
    side resized to 256/224 of the crop (the long side truncated, as torchvision's Resize does),
    then the centred image_size square (its offset rounded, as CenterCrop does)."""
    short_to = image_size * 256 // 224
    long_to = int(short_to * max(height, width) / min(height, width))
    size_h, size_w = (short_to, long_to) if height <= width else (long_to, short_to)
    top, left = int(round((size_h - image_size) / 2)), int(round((size_w - image_size) / 2))
    scale_h, scale_w = height / size_h, width / size_w
    return top * scale_h, left * scale_w, image_size * scale_h, image_size * scale_w


def jpeg_size(data: bytes, path: str) -> tuple[int, int]:
    """(height, width) from the frame header, without decoding; a file that is not a JPEG, or
    has no frame header, is named."""
    if not data.startswith(JPEG_MAGIC):
        raise ValueError(f"{path} is not a JPEG file (decoder: nvjpeg reads JPEG only); "
                         "convert it, remove it, or set decoder: pil")
    at = 2
    while at + 9 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte before the marker
            at += 1
        elif marker in FRAME_MARKERS:
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            if height and width:
                return height, width
            break
        elif marker in (0xD9, 0xDA):  # end of image, or scan data, before any frame header
            break
        else:
            at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    raise ValueError(f"{path} cannot be decoded (no JPEG frame header with a size); remove or re-encode it")


class Encoded(NamedTuple):
    """One step's shard as the loader hands it over: the files' bytes back to back, where each
    starts (and the end), the part of each image that goes onto the canvas (top, left, h, w),
    the crop within that part as an roi_align box (x1, y1, x2, y2, pixel edges), the flips, the classes."""

    data: torch.Tensor
    offsets: list[int]
    regions: list[tuple[int, int, int, int]]
    boxes: torch.Tensor
    flips: torch.Tensor
    targets: torch.Tensor
    paths: list[str]


class _EncodedSteps(torch.utils.data.Dataset):
    """Item `step`: this shard's Encoded batch (runs in the loader's worker processes)."""

    def __init__(self, cfg: RunConfig, samples: list[tuple[str, int]], shard: int):
        self._cfg, self._samples, self._shard = cfg, samples, shard

    def __len__(self) -> int:
        return self._cfg.steps

    def __getitem__(self, step: int) -> Encoded:
        cfg = self._cfg
        positions = shard_positions(step=step, shard=self._shard, batch_size_per_worker=cfg.batch_size_per_worker,
                                    global_batch_size=cfg.global_batch_size)
        indices = dataset_indices(positions, seed=cfg.seed, dataset_size=len(self._samples))
        paths, files, regions, boxes, flips = [], [], [], [], []
        for index, position in zip(indices, positions):
            path = self._samples[index][0]
            with open(path, "rb") as file:
                data = file.read()
            height, width = jpeg_size(data, path)
            if cfg.augment == "standard":  # the crop alone goes to the canvas; the box is all of it
                top, left, h, w, flip = augment_params(seed=cfg.seed, position=position, height=height, width=width)
                regions.append((top, left, h, w))
                boxes.append((0.0, 0.0, w, h))
            else:  # the whole image goes, and the box is the resized image's centred crop
                top, left, h, w = centre_crop_box(height, width, cfg.image_size)
                regions.append((0, 0, height, width))
                boxes.append((left, top, left + w, top + h))
                flip = False
            paths.append(path)
            files.append(data)
            flips.append(flip)
        offsets = [0]
        for data in files:
            offsets.append(offsets[-1] + len(data))
        return Encoded(torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8), offsets, regions,
                       torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips),
                       torch.tensor([self._samples[i][1] for i in indices]), paths)


class JpegShardSource:
    """Logical shard `shard` of each step's batch of a JPEG folder, on its device; `batch(step)`
    in any order (a jump restarts the loader at the new step; the next one is prepared ahead on cuda)."""

    def __init__(self, cfg: RunConfig, *, shard: int, device: torch.device):
        self._cfg, self._device = cfg, device
        folder = torchvision.datasets.ImageFolder(cfg.data_dir, loader=str)  # paths only: nothing decoded
        samples = folder.samples
        if cfg.val_fraction:
            train, _ = split_held_out(folder.targets, fraction=cfg.val_fraction, seed=cfg.seed)
            samples = [samples[i] for i in train]
        self._dataset = _EncodedSteps(cfg, samples, shard)
        self._loader: Iterator[Encoded] | None = None
        self._next_step = -1
        on_gpu = device.type == "cuda"
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="jpeg-ahead") if on_gpu else None
        # High priority: the batch's few short kernels run as soon as SMs free up, not after the
        # training step's queued convolutions (which then wait for them only at the step's end).
        self._stream = torch.cuda.Stream(device, priority=-1) if on_gpu else None
        self._pending: tuple[int, Future] | None = None
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self._inv_std = 1 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)

    def close(self) -> None:
        """Wait for the batch being prepared, then stop the thread and the loader's processes."""
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        if self._ahead is not None:
            self._ahead.shutdown(wait=True)
        self._loader, self._next_step = None, -1

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == step:
            images, targets, ready = pending[1].result()
        else:
            if pending is not None:  # not wanted, but it must not run beside this one; its error
                pending[1].exception()  # (another step's bad file) is not this step's: waited for, not raised
            images, targets, ready = self._prepare(step)
        if ready is not None:  # made on the side stream: the step's stream waits for it, and owns it
            current = torch.cuda.current_stream(self._device)
            current.wait_event(ready)
            images.record_stream(current)
            targets.record_stream(current)
        if self._ahead is not None and step + 1 < self._cfg.steps:
            self._pending = (step + 1, self._ahead.submit(self._prepare, step + 1))
        return images, targets

    def encoded(self, step: int) -> Encoded:
        """Step `step`'s shard from the loader (restarted there unless it is the next one)."""
        if step != self._next_step:
            self._loader = iter(torch.utils.data.DataLoader(
                self._dataset, batch_size=None, sampler=range(step, self._cfg.steps),
                num_workers=self._cfg.loader_workers, persistent_workers=False))
        self._next_step = step + 1
        return next(self._loader)

    def _prepare(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        batch = self.encoded(step)
        on_stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with on_stream:
            images = self.decode_and_augment(batch)
            targets = batch.targets.to(self._device, non_blocking=True)
            ready = None
            if self._stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._stream)
        return images, targets, ready

    def decode_and_augment(self, batch: Encoded) -> torch.Tensor:
        """Decode, crop, resize, flip and normalise: (B, 3, S, S) float32 on the device."""
        ends = batch.offsets
        decoded = _decode([batch.data[start:end] for start, end in zip(ends[:-1], ends[1:])], batch.paths,
                          self._device)
        boxes = batch.boxes.to(self._device, non_blocking=True)
        # One canvas for the parts up to CANVAS_SIDE; a larger one gets its own, so that a few
        # huge photos do not make the whole batch's canvas huge (the result is the same either way).
        small = [max(region[2:]) <= CANVAS_SIDE for region in batch.regions]
        shared, alone = [k for k in range(len(small)) if small[k]], [k for k in range(len(small)) if not small[k]]
        crops = self._crop([decoded[k] for k in shared], [batch.regions[k] for k in shared], boxes[shared])
        if alone:
            crops = torch.cat([crops] + [self._crop([decoded[k]], [batch.regions[k]], boxes[k:k + 1]) for k in alone])
            crops = crops[torch.tensor(shared + alone).argsort().to(self._device)]
        flips = batch.flips.to(self._device, non_blocking=True).view(-1, 1, 1, 1)
        crops = torch.where(flips, crops.flip(-1), crops)
        return (crops - self._mean).mul_(self._inv_std)

    def _crop(self, images: list[torch.Tensor], regions: list[tuple[int, int, int, int]],
              boxes: torch.Tensor) -> torch.Tensor:
        """roi_align of each box on a canvas of the images' regions (bilinear, as torchvision's
        resize maps output pixels, averaged over each output pixel's footprint)."""
        size = self._cfg.image_size
        if not images:
            return torch.empty(0, 3, size, size, device=self._device)
        canvas = self._canvas(images, regions)
        index = torch.arange(len(images), dtype=boxes.dtype, device=boxes.device)[:, None]  # box k on canvas image k
        return roi_align(canvas, torch.cat([index, boxes], dim=1), output_size=(size, size), spatial_scale=1.0,
                         sampling_ratio=-1, aligned=True)

    def _canvas(self, images: list[torch.Tensor], regions: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """(B, 3, max h + 1, max w + 1) float32: image k's region at the top left of slot k, its
        last row and column repeated to the slot's edges. A sample near the region's far edge so
        sees what torchvision's resize sees there (it clamps), whatever canvas the image shares.

        Built by a few gathers from the images laid end to end, not by a copy per image: the
        launches of a per-image copy cost the replica's CPU about 40 us an image, and that CPU
        time competes with the training step's own launches."""
        flat, shapes, canvas_h, canvas_w = canvas_inputs(images, regions)
        canvas = torch.empty(len(images), 3, canvas_h, canvas_w, device=self._device)
        for first in range(0, len(images), CANVAS_CHUNK):  # the int64 index of a chunk: 8 bytes a canvas pixel
            canvas[first:first + CANVAS_CHUNK] = gather_canvas(flat, shapes[first:first + CANVAS_CHUNK],
                                                               canvas_h, canvas_w)
        return canvas


def canvas_inputs(images: list[torch.Tensor], regions: list[tuple[int, int, int, int]]
                  ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """What gather_canvas takes for `images` (each (3, H, W) uint8, on one device) and their
    canvas regions: the images laid end to end, their shapes, the canvas's height and width."""
    flat = torch.cat([image.reshape(-1) for image in images])
    starts = [0]
    for image in images[:-1]:
        starts.append(starts[-1] + image.numel())
    shapes = [(start, image.shape[-2], image.shape[-1], *region) for start, image, region in
              zip(starts, images, regions)]
    canvas_h, canvas_w = max(region[2] for region in regions) + 1, max(region[3] for region in regions) + 1
    return flat, torch.tensor(shapes, device=flat.device), canvas_h, canvas_w


def gather_canvas(flat: torch.Tensor, shapes: torch.Tensor, canvas_h: int, canvas_w: int) -> torch.Tensor:
    """(B, 3, canvas_h, canvas_w) uint8 from `flat`, the (3, H, W) uint8 images laid end to end:
    row k of `shapes` is image k's (start in flat, H, W, top, left, h, w); slot k holds its region
    (top, left, h, w), the last row and column repeated to the slot's edges. (Compiled with
    torch.compile into one kernel it cost an H200's training step more, not less: README.)"""
    start, height, width, top, left, h, w = shapes.unbind(1)
    device = flat.device
    rows = torch.minimum(torch.arange(canvas_h, device=device), (h - 1)[:, None]) + top[:, None]  # (B, Hc)
    cols = torch.minimum(torch.arange(canvas_w, device=device), (w - 1)[:, None]) + left[:, None]  # (B, Wc)
    planes = start[:, None] + torch.arange(3, device=device) * (height * width)[:, None]  # (B, 3)
    index = planes[:, :, None, None] + (rows * width[:, None])[:, None, :, None] + cols[:, None, None, :]
    return flat[index]


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
