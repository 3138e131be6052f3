"""scikit-learn's handwritten digits (1,797 8x8 images, 10 classes, shipped inside the package)
written out as an ImageFolder of RGB PNGs: real images for the tests and benchmarks to learn."""

from __future__ import annotations

from pathlib import Path


def write_digits(root: Path) -> Path:
    """root/<class>/<index>.png for every digit; returns root."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).convert("RGB").save(folder / f"{index:04d}.png")
    return root
