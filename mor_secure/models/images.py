"""Images as the models see them: decoded RGB PIL images with a content key.

A model receives either a path (the silo's own training data, on its disk)
or a `KeyedImage` (bytes a caller sent, decoded by the silo's service after
checking their SHA-256). Either way `image_key` is the SHA-256 of the encoded
bytes, so every cache (features, reference likelihoods) is keyed by content,
never by where a file happens to lie: a silo directory copied to another
machine finds its caches valid and scores identically.

easy-VQA images are 64x64 PNGs; the whole benchmark (5,000 images) fits in a
few tens of MB decoded, so a process-wide cache removes repeated PNG decoding
from every training epoch. The cache is bounded by decoded bytes: a silo's
own photos beyond it are decoded again when read again.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .caches import LRUCache

# Bounded by decoded bytes, not by count: the 5,000 easy-VQA images (64*64*4 bytes each in PIL, ~80 MB) all fit,
# and a silo's own photos cannot fill memory (8,192 of 2000x2000 pixels would be ~130 GB; 512 MB holds 33).
_IMAGE_CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True, eq=False)
class KeyedImage:
    """A decoded RGB image and the SHA-256 (hex) of the encoded bytes it came from."""

    sha256: str
    image: Image.Image


ImageInput = KeyedImage | str | Path


def _decoded_bytes(image: KeyedImage) -> int:
    width, height = image.image.size
    return width * height * 4  # PIL keeps an RGB image at 4 bytes a pixel (measured: 152 MB for 114 MB of RGB)


_file_images: LRUCache[tuple[str, int, int], KeyedImage] = LRUCache(None, max_weight=_IMAGE_CACHE_BYTES,
                                                                     weigh=_decoded_bytes)
_file_images_lock = threading.Lock()  # the coordinator reads images from several threads


def _read_file_image(path: Path) -> KeyedImage:
    data = path.read_bytes()
    with Image.open(path) as image:
        return KeyedImage(sha256=hashlib.sha256(data).hexdigest(), image=image.convert("RGB"))


def keyed(image: ImageInput) -> KeyedImage:
    """A `KeyedImage` as is; a path read (once per process while unchanged and cached), hashed and decoded."""
    if isinstance(image, KeyedImage):
        return image
    stat = Path(image).stat()
    # Keyed by (path, mtime, size) so an edited file is read again rather than served stale.
    key = (str(image), stat.st_mtime_ns, stat.st_size)
    with _file_images_lock:
        found = _file_images.get(key)
    if found is None:
        found = _read_file_image(Path(image))
        with _file_images_lock:
            _file_images.put(key, found)
    return found


def image_key(image: ImageInput) -> str:
    """The content key of an image: the SHA-256 of its encoded bytes."""
    return keyed(image).sha256


def load_rgb(path: str | Path) -> Image.Image:
    """Open `path` as an RGB image (decoded once per process while it stays in the cache)."""
    return keyed(path).image


def as_pil(image: ImageInput | Image.Image) -> Image.Image:
    """An RGB PIL image from a PIL image, a `KeyedImage` or a path."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return keyed(image).image


def as_square(image: ImageInput | Image.Image, size: int) -> Image.Image:
    """An RGB PIL image of size x size, resized with bilinear filtering when needed (aspect ratio not kept).

    Every model takes its input at one square size, so this bounds what any
    image costs it at size^2 pixels, whatever the image's shape: a 16384x1
    image passed whole to a processor that scales the shortest edge to 64
    became 1,048,576x64 (~620 MB) before its centre crop.
    """
    pil = as_pil(image)
    return pil if pil.size == (size, size) else pil.resize((size, size), Image.BILINEAR)


def to_uint8_tensor(image: ImageInput | Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) uint8 tensor of `as_square(image, size)`."""
    return torch.from_numpy(np.asarray(as_square(image, size), dtype=np.uint8).copy()).permute(2, 0, 1)
