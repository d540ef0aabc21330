"""The frozen EfficientNet image encoder's feature cache: bounded while serving, written without a rewrite per request."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from mor_secure.models import encoders
from mor_secure.models.encoders import ImageFeatureEncoder
from mor_secure.models.images import KeyedImage
from mor_secure.wire.messages import sha256_hex


def _image(index: int) -> KeyedImage:
    image = Image.new("RGB", (8, 8), (index * 40 % 256, 7, 99))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return KeyedImage(sha256=sha256_hex(buffer.getvalue()), image=image)


def test_a_served_cache_keeps_the_most_recent_features_and_is_not_rewritten_per_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every image a caller sent stayed cached for the server's life, and each request with a new one rewrote
    the whole file: both grew with everything ever sent."""
    monkeypatch.setattr(encoders, "SERVED_IMAGE_FEATURES", 4)
    encoder = ImageFeatureEncoder(tmp_path, serving=True)
    cache_file = tmp_path / "efficientnet_lite0_224_sha256.pt"
    images = [_image(i) for i in range(6)]
    written, inode = [], None
    for image in images:  # one request per new image
        encoder.encode([image])
        now = cache_file.stat().st_ino  # write-then-rename: a new file each write
        written.append(now != inode)
        inode = now
        assert len(encoder._cache) <= 4
    # Written when the features computed since the last write reach the count it held: 1, 2, then 4 (the cap).
    assert written == [True, True, False, True, False, False]
    assert len(torch.load(cache_file, weights_only=True)) == 4

    # The least recently used went first, and an evicted image is encoded again, to the same features.
    assert {i.sha256 for i in images[2:]} == set(dict(encoder._cache.items()))
    again = encoder.encode([images[0], images[5]])
    fresh = ImageFeatureEncoder().encode([images[0], images[5]])
    assert torch.allclose(again, fresh, atol=1e-6)

    # A server restarted on the file starts from what it held.
    assert len(ImageFeatureEncoder(tmp_path, serving=True)._cache) == 4


def test_a_partys_own_images_are_all_kept_and_written_after_each_call(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Training and the router encode a known set in a few calls: no cap, and each call's features on disk."""
    monkeypatch.setattr(encoders, "SERVED_IMAGE_FEATURES", 2)
    encoder = ImageFeatureEncoder(tmp_path)
    encoder.encode([_image(i) for i in range(3)])
    encoder.encode([_image(3)])
    assert len(encoder._cache) == 4
    assert len(torch.load(tmp_path / "efficientnet_lite0_224_sha256.pt", weights_only=True)) == 4
