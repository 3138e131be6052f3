"""ImageFolder trees as the driver sees them: class names, images per class, the held-out split.

Torch-free, so the driver checks a user's folders before Ray places anything (a
missing or empty val_dir, class sets that differ, a val_fraction that empties a
class) and names the problem in one line. The replicas build torchvision's
ImageFolder over the same trees; `held_out_count` is the one rule both sides use.
"""

from __future__ import annotations

import os
from pathlib import Path

from distrib.config import RunConfig
from distrib.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""What torchvision's ImageFolder counts as an image (its IMG_EXTENSIONS; a test keeps them equal)."""


def class_counts(root: str | Path) -> dict[str, int]:
    """Images per class folder of an ImageFolder root, classes sorted as ImageFolder sorts them."""
    counts = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir():
            counts[entry.name] = sum(1 for _, _, files in os.walk(entry.path, followlinks=True)
                                     for name in files if name.lower().endswith(IMAGE_EXTENSIONS))
    return counts


def held_out_count(num_images: int, fraction: float) -> int:
    """Images of a class of `num_images` that val_fraction holds out (rounded, at least 1 when > 0)."""
    return max(1, round(num_images * fraction)) if fraction > 0 else 0


def class_names(cfg: RunConfig) -> list[str]:
    """The names of the model's output classes: the folder names for folder data, else '0', '1', ..."""
    if cfg.data == "folder":
        return list(class_counts(cfg.data_dir))
    return [str(i) for i in range(cfg.num_classes)]


def check(cfg: RunConfig) -> None:
    """ConfigError (one line, with the fix) for folders a run cannot train or evaluate on."""
    if cfg.data != "folder":
        return
    counts = nonempty_tree("data_dir", cfg.data_dir)
    if len(counts) > cfg.num_classes:  # class indices past the head would fail in the first step
        raise ConfigError(f"num_classes: {cfg.num_classes} is invalid: data_dir {cfg.data_dir!r} has "
                          f"{len(counts)} classes; set num_classes: {len(counts)}")
    if cfg.val_dir:
        val_counts = nonempty_tree("val_dir", cfg.val_dir)
        missing_in_val = sorted(set(counts) - set(val_counts))
        missing_in_train = sorted(set(val_counts) - set(counts))
        if missing_in_val or missing_in_train:
            where = (f"val_dir lacks {_some(missing_in_val)}" if missing_in_val
                     else f"data_dir lacks {_some(missing_in_train)}")
            raise ConfigError(f"val_dir: {cfg.val_dir!r} is invalid: its classes differ from data_dir's ({where}); "
                              "give both the same class folders")
    _check_formats(cfg.data_dir, cfg.decoder)
    if cfg.val_dir:  # the held-out set is decoded in the loader processes, never by nvjpeg
        _check_formats(cfg.val_dir, "torchvision" if cfg.decoder == "nvjpeg" else cfg.decoder)
    for name, count in counts.items():
        if count - held_out_count(count, cfg.val_fraction) < 1:
            images = f"{count} image{'s' if count != 1 else ''}"
            raise ConfigError(f"val_fraction: {cfg.val_fraction!r} is invalid: it leaves class {name!r} "
                              f"({images}) with none to train on; lower it or add images")


def nonempty_tree(key: str, root: str) -> dict[str, int]:
    if not Path(root).is_dir():
        raise ConfigError(f"{key}: {root!r} is invalid: no such directory; point it at an ImageFolder root "
                          "(one sub-folder per class)")
    counts = class_counts(root)
    empty = [name for name, count in counts.items() if count == 0]
    if not counts or empty:
        what = f"class folder {empty[0]!r} holds no images" if empty else "it has no class folders"
        raise ConfigError(f"{key}: {root!r} is invalid: {what}; an ImageFolder root has one sub-folder of "
                          f"images ({', '.join(IMAGE_EXTENSIONS)}) per class")
    return counts


DECODES = {"nvjpeg": (".jpg", ".jpeg"), "torchvision": (".jpg", ".jpeg", ".png", ".webp")}
"""The image files each decoder reads, by extension (pil reads all of IMAGE_EXTENSIONS)."""


def _check_formats(root: str, decoder: str) -> None:
    """ConfigError naming the first image file under `root` that `decoder` cannot read."""
    readable = DECODES.get("torchvision" if decoder == "auto" else decoder)
    if readable is None:
        return
    for folder, _, files in os.walk(root, followlinks=True):
        if os.path.samefile(folder, root):
            continue  # files beside the class folders: ImageFolder never reads them
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.lower().endswith(readable):
                raise ConfigError(f"decoder: {decoder} reads {', '.join(readable)} files, not "
                                  f"{os.path.join(folder, name)!r}; convert it, or set decoder: pil")


def _some(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
