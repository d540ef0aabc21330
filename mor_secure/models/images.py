"""Image loading shared by every model: RGB PIL images, cached per path.

easy-VQA images are 64x64 PNGs; the whole benchmark (5,000 images) fits in a
few tens of MB decoded, so a process-wide cache removes repeated PNG decoding
from every training epoch.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# 5,000 easy-VQA images * 64*64*3 bytes ~ 60 MB: cache them all.
_IMAGE_CACHE_SIZE = 8192


@lru_cache(maxsize=_IMAGE_CACHE_SIZE)
def load_rgb(path: str | Path) -> Image.Image:
    """Open `path` as an RGB image (decoded once per process)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def as_pil(image: Image.Image | str | Path) -> Image.Image:
    """Accept a PIL image or a path; return an RGB PIL image."""
    return image.convert("RGB") if isinstance(image, Image.Image) else load_rgb(str(image))


def to_uint8_tensor(image: Image.Image | str | Path, size: int) -> torch.Tensor:
    """(3, size, size) uint8 tensor, resized with bilinear filtering when needed."""
    pil = as_pil(image)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)
