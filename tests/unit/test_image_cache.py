"""The process-wide cache of decoded image files is bounded by decoded bytes, not by count."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mor_secure.models import images
from mor_secure.models.caches import LRUCache
from mor_secure.models.images import image_key, keyed

SIDE = 64
DECODED = SIDE * SIDE * 4


def test_decoded_images_are_kept_up_to_a_byte_budget(tmp_path: Path, monkeypatch) -> None:
    budget = LRUCache(None, max_weight=3 * DECODED, weigh=images._decoded_bytes)
    monkeypatch.setattr(images, "_file_images", budget)
    paths = []
    for index in range(5):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (SIDE, SIDE), (index * 40, 0, 0)).save(path)
        paths.append(path)
    keys = [image_key(path) for path in paths]
    assert len(budget) == 3  # the two least recently read were dropped
    assert [image_key(path) for path in paths] == keys  # and are read again, the same
    big = tmp_path / "big.png"
    Image.new("RGB", (SIDE * 2, SIDE * 2)).save(big)  # alone over the budget: returned, never kept
    assert keyed(big).image.size == (SIDE * 2, SIDE * 2) and len(budget) == 3


def test_a_weighed_cache_needs_its_weight_cap_and_frees_a_replaced_entry() -> None:
    with pytest.raises(ValueError, match="give both or neither"):
        LRUCache(None, weigh=len)
    cache: LRUCache[str, str] = LRUCache(None, max_weight=4, weigh=len)
    cache.put("a", "xx")
    cache.put("a", "yyy")  # replaced: its old weight no longer counts
    cache.put("b", "z")
    assert (cache.get("a"), cache.get("b")) == ("yyy", "z")
