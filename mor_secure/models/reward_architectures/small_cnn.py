"""Architecture c: a small CNN and word embeddings, trained by the silo from random init.

No external weights. DP noise blocks a from-scratch CNN (measured before
filing: 0.66-0.68 pairwise accuracy on shape under DP at epsilon 8 vs 0.99
without DP; here 0.64 on colour after 20 DP epochs, 265 s). The standard way
past it is public pre-training: the trunk is first trained, without DP, to name
the colour and shape of the images of the consortium's *public* SFT split
(`pretrain_trunk`), then frozen. DP-SGD then trains only the word embeddings
and the head on private pairs, on cached trunk features.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mor_secure.data.easyvqa import ANSWERS_BY_KIND
from mor_secure.data.records import VQARecord

from ..reward_heads import InteractionHead
from ..images import ImageInput, to_uint8_tensor
from ..reward_model import LocalResources, RewardModel, Standardisation, register

TRUNK_FILE = "trunk.safetensors"
SCORER_FILE = "scorer.safetensors"
IMAGE_SIZE = 64
# Opacus materialises a per-sample gradient of the whole embedding table, so the
# table is kept small; easy-VQA has ~40 distinct words.
WORD_BUCKETS = 512
MAX_WORDS = 16
PAD_ID = 0


def hashed_word_ids(texts: Sequence[str], *, max_words: int = MAX_WORDS) -> torch.Tensor:
    """(N, max_words) bucket ids (1..WORD_BUCKETS-1, 0 = padding); crc32 is stable across processes."""
    out = torch.full((len(texts), max_words), PAD_ID, dtype=torch.long)
    for row, text in enumerate(texts):
        words = text.lower().replace("?", " ").split()[:max_words]
        for col, word in enumerate(words):
            out[row, col] = 1 + zlib.crc32(word.encode()) % (WORD_BUCKETS - 1)
    return out


def make_trunk(channels: int) -> nn.Sequential:
    """Four stride-2 conv blocks (64 -> 4 px) and global pooling: 64x64x3 -> `channels` features.

    Depth 4 is what shape needs: measured on held-out easy-VQA images after public
    pre-training, 3 blocks named shapes at 0.51, 4 blocks at 0.95 (colour 1.00 either way).
    GroupNorm, not BatchNorm: BatchNorm mixes samples, which breaks per-sample clipping.
    """
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.ReLU()]

    return nn.Sequential(*block(3, channels // 2), *block(channels // 2, channels),
                         *block(channels, channels), *block(channels, channels),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


class BagOfWords(nn.Module):
    """Mean of word embeddings over non-padding positions: ids [..., words] -> [..., dim]."""

    def __init__(self, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(WORD_BUCKETS, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != PAD_ID).unsqueeze(-1).float()
        return (self.embedding(ids) * mask).sum(-2) / mask.sum(-2).clamp(min=1.0)


class WordsAndHead(nn.Module):
    """The DP-trained part: question and answer embeddings and the interaction head.

    Like the head, it scores any leading shape, so DP training feeds it whole
    privacy units ([b, K, ...]; `privacy_units.scores_unit_batches`).
    """

    scores_unit_batches = True

    def __init__(self, image_dim: int, text_dim: int, width: int):
        super().__init__()
        self.question = BagOfWords(text_dim)
        self.answer = BagOfWords(text_dim)
        self.head = InteractionHead(image_dim, text_dim, text_dim, width=width)

    def forward(self, image_features: torch.Tensor, question_ids: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        return self.head(image_features, self.question(question_ids), self.answer(answer_ids))


def pretrain_trunk(trunk: nn.Module, records: Sequence[VQARecord], *, steps: int = 800, batch_size: int = 128,
                   learning_rate: float = 3e-3, seed: int = 0, progress: bool = False) -> float:
    """Train `trunk` to classify colour and shape of PUBLIC images, then freeze it; returns final batch accuracy.

    Never call this with private records: it is not differentially private.
    """
    labels: dict[Path, dict[str, int]] = {}
    for record in records:
        if record.kind in ("color", "shape"):
            labels.setdefault(record.image_path, {})[record.kind] = ANSWERS_BY_KIND[record.kind].index(record.answer)
    images = [path for path, known in labels.items() if len(known) == 2]
    if not images:
        raise ValueError("trunk pre-training needs public records with colour and shape answers")
    torch.manual_seed(seed)
    # The trunk may already be frozen (side_inputs freezes it): training it must unfreeze it,
    # or pre-training would silently change nothing.
    for parameter in trunk.parameters():
        parameter.requires_grad_(True)
    pixels = torch.stack([to_uint8_tensor(p, IMAGE_SIZE) for p in images]).float() / 255.0
    colour = torch.tensor([labels[p]["color"] for p in images])
    shape = torch.tensor([labels[p]["shape"] for p in images])
    features = trunk(pixels[:1]).shape[-1]
    colour_head = nn.Linear(features, len(ANSWERS_BY_KIND["color"]))
    shape_head = nn.Linear(features, len(ANSWERS_BY_KIND["shape"]))
    optimizer = torch.optim.Adam([*trunk.parameters(), *colour_head.parameters(), *shape_head.parameters()],
                                 lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    accuracy = 0.0
    trunk.train()
    for _ in tqdm(range(steps), desc="public trunk pre-training", unit="step", disable=not progress):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        feats = trunk(pixels[idx])
        c_logits, s_logits = colour_head(feats), shape_head(feats)
        loss = nn.functional.cross_entropy(c_logits, colour[idx]) + nn.functional.cross_entropy(s_logits, shape[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        accuracy = 0.5 * ((c_logits.argmax(1) == colour[idx]).float().mean()
                          + (s_logits.argmax(1) == shape[idx]).float().mean()).item()
    freeze(trunk)
    return accuracy


def freeze(module: nn.Module) -> None:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)


@register
class SmallCNNRewardModel(RewardModel):
    architecture = "small_cnn"

    def __init__(self, *, channels: int = 32, text_dim: int = 64, width: int = 64,
                 standardisation: Standardisation | None = None, seed: int = 0):
        torch.manual_seed(seed)
        self.trunk = make_trunk(channels)
        super().__init__(WordsAndHead(channels, text_dim, width), standardisation)
        self.settings = {"channels": channels, "text_dim": text_dim, "width": width}

    def pretrain(self, public_records: Sequence[VQARecord], **options) -> float:
        """Public pre-training of the trunk (see module docstring); must precede DP training."""
        return pretrain_trunk(self.trunk, public_records, **options)

    @torch.no_grad()
    def side_inputs(self, images: Sequence[ImageInput], prompts: Sequence[str],
                    responses: Sequence[str]) -> tuple[torch.Tensor, ...]:
        freeze(self.trunk)
        pixels = torch.stack([to_uint8_tensor(p, IMAGE_SIZE) for p in images]) if images \
            else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        features = torch.cat([self.trunk(chunk.float() / 255.0) for chunk in pixels.split(512)]) if images \
            else torch.zeros(0, self.settings["channels"])
        return features, hashed_word_ids(prompts), hashed_word_ids(responses)

    def _save_weights(self, directory: Path) -> dict:
        save_file(self.trunk.state_dict(), str(directory / TRUNK_FILE))
        save_file(self.module.state_dict(), str(directory / SCORER_FILE))
        return self.settings

    @classmethod
    def _load(cls, directory: Path, settings: dict, standardisation: Standardisation,
              resources: LocalResources) -> SmallCNNRewardModel:
        model = cls(**settings, standardisation=standardisation)
        model.trunk.load_state_dict(load_file(str(directory / TRUNK_FILE)))
        model.module.load_state_dict(load_file(str(directory / SCORER_FILE)))
        return model
