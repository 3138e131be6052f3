"""A real photograph shipped inside matplotlib (sample_data/grace_hopper.jpg, 512x600) written out
as an ImageFolder of JPEGs of varied sizes: real JPEGs for the decoder tests and benchmarks.
matplotlib is a dependency of distrib, so this works wherever distrib's tests run (GPU machines too)."""

from __future__ import annotations

from pathlib import Path


def write_photos(root: Path, *, per_class: int = 12, seed: int = 0, sizes: tuple[int, int] = (48, 400),
                 quality: int = 90, first_index: int = 0) -> Path:
    """root/{top,bottom}/<index>.jpg, index from `first_index`: `per_class` seeded crops of the photo's top and bottom
    halves, scaled to `sizes` px a side, re-encoded as JPEG (every fifth one greyscale, which
    the decoders turn into RGB); returns root."""
    import random

    from matplotlib import cbook
    from PIL import Image

    rng = random.Random(seed)
    with cbook.get_sample_data("grace_hopper.jpg") as file:
        photo = Image.open(file).convert("RGB")
    halves = {"top": photo.crop((0, 0, photo.width, photo.height // 2 + 100)),
              "bottom": photo.crop((0, photo.height // 2 - 100, photo.width, photo.height))}
    for name, half in halves.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(first_index, first_index + per_class):
            crop_w, crop_h = rng.randint(half.width // 3, half.width), rng.randint(half.height // 3, half.height)
            left, top = rng.randint(0, half.width - crop_w), rng.randint(0, half.height - crop_h)
            image = half.crop((left, top, left + crop_w, top + crop_h))
            image = image.resize((rng.randint(*sizes), rng.randint(*sizes)), Image.Resampling.BILINEAR)
            if index % 5 == 4:
                image = image.convert("L")
            image.save(folder / f"{index:03d}.jpg", quality=quality)
    return root
