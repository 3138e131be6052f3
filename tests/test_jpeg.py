"""The decoders keep the data contract of the PIL path: the same images, crops and flips at each
stream position, N workers equal to 1 worker, and bad files named. decoder: torchvision gives
PIL's batches bit for bit; decoder: nvjpeg (distrib/jpeg.py, run here on the CPU where the GPU
tests do not run) equal to rounding. Real JPEGs: crops of the photograph matplotlib ships."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from distrib import RunConfig, folders, jpeg
from distrib.config import ConfigError
from distrib.data import IMAGENET_STD, ShardSource, pil_rgb, sample_seed, torchvision_rgb
from distrib.jpeg import JpegShardSource, augment_params

ONE_LEVEL = 1 / 255 / min(IMAGENET_STD) + 1e-6
"""One step of 8-bit rounding after normalisation: the PIL path rounds its resized pixels, ours does not."""


def jpeg_cfg(folder, **changes) -> RunConfig:
    return RunConfig(num_workers=1, device="cpu", data="folder", data_dir=str(folder), num_classes=2,
                     batch_size_per_worker=8, image_size=64, loader_workers=0, decoder="torchvision",
                     steps=4).replace(**changes)


def batches(source, steps: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
    try:
        return [source.batch(step) for step in steps]
    finally:
        source.close()


@pytest.mark.parametrize(("height", "width"), [(375, 500), (64, 48), (20, 400), (400, 20)])
def test_crop_and_flip_are_drawn_as_torchvision_draws_them(height, width):
    image = torch.empty(3, height, width)
    for position in range(200):
        torch.manual_seed(sample_seed(7, position))
        expected = (*transforms.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)),
                    bool(torch.rand(1) < 0.5))  # RandomHorizontalFlip's draw comes after the crop's
        assert augment_params(seed=7, position=position, height=height, width=width) == expected


@pytest.mark.parametrize("augment", ["standard", "none"])
def test_batches_equal_the_pil_path_up_to_the_resize_filter(photos_folder, augment):
    cfg = jpeg_cfg(photos_folder, augment=augment)
    cpu = torch.device("cpu")
    ours = batches(JpegShardSource(cfg, shard=0, device=cpu), range(3))
    theirs = batches(ShardSource(cfg, shard=0, device=cpu), range(3))
    for (images, targets), (pil_images, pil_targets) in zip(ours, theirs):
        assert images.shape == pil_images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
        assert torch.equal(targets, pil_targets)
        # the same crops (a shifted or rescaled one is 5-8 levels off on average at 64 px); the
        # box filter of roi_align against PIL's triangle filter: 0.8-1.4 levels measured
        assert (images - pil_images).abs().mean() <= 2 * ONE_LEVEL


@pytest.mark.parametrize("augment", ["standard", "none"])
def test_torchvision_decoding_in_the_loader_workers_gives_pils_batches_bit_for_bit(photos_folder, augment):
    cpu = torch.device("cpu")
    ours = batches(ShardSource(jpeg_cfg(photos_folder, augment=augment, loader_workers=1), shard=0,
                               device=cpu), range(3))
    theirs = batches(ShardSource(jpeg_cfg(photos_folder, augment=augment, decoder="pil"), shard=0,
                                 device=cpu), range(3))
    for (images, targets), (pil_images, pil_targets) in zip(ours, theirs):
        assert images.shape == (8, 3, 64, 64) and torch.equal(targets, pil_targets)
        assert torch.equal(images, pil_images)


def test_torchvision_decoding_names_a_file_it_cannot_decode(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="bad.jpg cannot be decoded by torchvision .*set decoder: pil"):
        torchvision_rgb(str(bad))


def test_pil_decoding_names_a_truncated_file(photos_folder, tmp_path):
    cut = tmp_path / "cut.jpg"
    whole = (photos_folder / "top" / "000.jpg").read_bytes()
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match="cut.jpg cannot be decoded by PIL .*; re-encode or remove it"):
        pil_rgb(str(cut))


def test_a_16_bit_png_is_scaled_to_8_bits(tmp_path):
    """torchvision decodes a 16-bit PNG to uint16 (values up to 65535), which a uint8 batch
    cannot hold: each value becomes its high byte, so the ramp stays a ramp."""
    path = tmp_path / "deep.png"
    ramp = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(path)
    image = torchvision_rgb(str(path))
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    expected = torch.from_numpy((ramp >> 8).astype(np.uint8))
    assert all(torch.equal(channel, expected) for channel in image)


def test_two_ranks_make_the_one_rank_batch(photos_folder):
    # Each half's crops share a smaller canvas than the whole batch's; the halves are made in a
    # loader process, the whole batch in this one.
    cpu = torch.device("cpu")
    whole = batches(JpegShardSource(jpeg_cfg(photos_folder), shard=0, device=cpu), range(2, 4))
    halves = [batches(JpegShardSource(jpeg_cfg(photos_folder, num_workers=2, batch_size_per_worker=4,
                                                loader_workers=1), shard=rank, device=cpu), range(2, 4))
              for rank in (0, 1)]
    for step, (images, targets) in enumerate(whole):
        assert torch.equal(images, torch.cat([halves[0][step][0], halves[1][step][0]]))
        assert torch.equal(targets, torch.cat([halves[0][step][1], halves[1][step][1]]))


@pytest.mark.parametrize(("content", "expected"), [
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "is not a JPEG file"),
    (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "cannot be decoded"),
])
def test_a_bad_file_is_named(photos_folder, tmp_path, content, expected):
    folder = tmp_path / "photos"
    for name in ("top", "bottom"):
        (folder / name).mkdir(parents=True)
        (folder / name / "000.jpg").write_bytes((photos_folder / name / "000.jpg").read_bytes())
    (folder / "bottom" / "bad.jpg").write_bytes(content)
    source = JpegShardSource(jpeg_cfg(folder, batch_size_per_worker=3), shard=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=expected) as err:
        batches(source, range(1))
    assert str(folder / "bottom" / "bad.jpg") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("decoder", "extra", "refused"), [
    ("pil", "001.bmp", False), ("torchvision", "001.png", False), ("torchvision", "001.bmp", True),
    ("auto", "001.tiff", True), ("nvjpeg", "001.png", True)])
def test_a_folder_with_images_the_decoder_cannot_read_is_refused_before_the_run(photos_folder, tmp_path, decoder,
                                                                              extra, refused):
    folder = tmp_path / "photos"
    for name in ("top", "bottom"):
        (folder / name).mkdir(parents=True)
        (folder / name / "000.jpg").write_bytes((photos_folder / name / "000.jpg").read_bytes())
    (folder / "bottom" / extra).write_bytes(b"")
    cfg = jpeg_cfg(folder, decoder=decoder, device="cuda" if decoder == "nvjpeg" else "cpu")
    if not refused:
        folders.check(cfg)
        return
    expected = f"decoder: {decoder} reads .* not .*{extra}'; convert it, or set decoder: pil"
    with pytest.raises(ConfigError, match=expected):
        folders.check(cfg)


def test_nvjpeg_takes_a_held_out_folder_of_pngs(photos_folder, tmp_path):
    """The held-out set is decoded in the loader processes (torchvision), never by nvjpeg."""
    val = tmp_path / "val"
    for name in ("top", "bottom"):
        (val / name).mkdir(parents=True)
        Image.open(photos_folder / name / "000.jpg").save(val / name / "000.png")
    folders.check(jpeg_cfg(photos_folder, decoder="nvjpeg", device="cuda", val_dir=str(val)))


@pytest.mark.gpu
def test_nvjpeg_batches_match_the_cpu_ones_and_the_prefetch_changes_nothing(photos_folder):
    cfg = jpeg_cfg(photos_folder, device="cuda", decoder="nvjpeg", steps=5)
    on_cpu = batches(JpegShardSource(cfg, shard=0, device=torch.device("cpu")), range(5))
    ahead = batches(JpegShardSource(cfg, shard=0, device=torch.device("cuda", 0)), range(5))
    one_by_one = [batches(JpegShardSource(cfg, shard=0, device=torch.device("cuda", 0)), range(s, s + 1))[0]
                  for s in range(5)]
    for (images, targets), (cpu_images, cpu_targets), (alone, _) in zip(ahead, on_cpu, one_by_one):
        assert torch.equal(targets.cpu(), cpu_targets)
        assert torch.equal(images, alone)
        # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a few levels, not by crops
        assert (images.cpu() - cpu_images).abs().mean() < 4 * ONE_LEVEL


def test_images_past_the_canvas_side_alone_give_the_same_batch(photos_folder, monkeypatch):
    cpu = torch.device("cpu")
    shared = batches(JpegShardSource(jpeg_cfg(photos_folder), shard=0, device=cpu), range(2))
    monkeypatch.setattr(jpeg, "CANVAS_SIDE", 150)  # the photos are 48-400 px a side: some go alone
    mixed = batches(JpegShardSource(jpeg_cfg(photos_folder), shard=0, device=cpu), range(2))
    for (images, targets), (alone_images, alone_targets) in zip(shared, mixed):
        assert torch.equal(images, alone_images) and torch.equal(targets, alone_targets)


def test_jpeg_size_reads_the_frame_header_of_baseline_progressive_and_grey_files(photos_folder, tmp_path):
    from PIL import Image

    paths = sorted(photos_folder.rglob("*.jpg"))[:6]
    progressive = tmp_path / "progressive.jpg"
    Image.open(paths[0]).save(progressive, progressive=True, quality=80)
    for path in paths + [progressive]:
        with Image.open(path) as image:
            assert jpeg.jpeg_size(path.read_bytes(), str(path)) == (image.height, image.width)
