"""The reward-model interface every silo architecture implements.

`score(images, prompts, responses) -> Tensor` returns standardised scores
(mean 0, std 1 on the consortium's public calibration pairs, so that nothing
fitted on private data is served) so that scores from heterogeneous silos are
on one scale before they leave the silo (DESIGN §2.1).

An architecture provides two things: `side_inputs` (tensors for one side of a
pair) and `module` (an nn.Module whose forward(*side_inputs) returns one score
per row). DP training, standardisation, scoring and persistence are shared.

Images are paths (the silo's own data) or `KeyedImage`s (bytes a caller sent,
decoded by the silo's service); every cache is keyed by content. A saved model
holds no path of the machine it was saved on: what a machine provides (the
shared VLM a LoRA model was trained on, a feature-cache directory) is passed
to `load_reward_model` as `LocalResources`, and checked against what the
model recorded (the backbone's digest).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import TensorDataset

from mor_secure.data.records import PreferencePair

from .images import ImageInput

MANIFEST = "reward_model.json"
_REGISTRY: dict[str, type[RewardModel]] = {}


@dataclass(frozen=True)
class Standardisation:
    """Affine map applied to raw scores: (raw - mean) / std."""

    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class LocalResources:
    """What the loading machine provides that a saved reward model does not contain."""

    base_model: Path | None = None  # the shared VLM checkpoint a lora_vlm model was trained on
    feature_cache: Path | None = None  # directory for frozen-feature caches (optional; speeds up scoring)


def register(cls: type[RewardModel]) -> type[RewardModel]:
    """Class decorator: make an architecture loadable by its `architecture` name."""
    _REGISTRY[cls.architecture] = cls
    return cls


def architectures() -> tuple[str, ...]:
    """Names of every registered architecture."""
    return tuple(sorted(_REGISTRY))


class RewardModel(ABC):
    """A silo's reward model r(image, prompt, response) -> score."""

    architecture: ClassVar[str]

    def __init__(self, module: nn.Module, standardisation: Standardisation | None = None):
        self.module = module
        self.standardisation = standardisation or Standardisation()

    # --- what an architecture defines -------------------------------------------------
    @abstractmethod
    def side_inputs(self, images: Sequence[ImageInput], prompts: Sequence[str],
                    responses: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """Tensors for one side of a batch of pairs; rows align with the arguments."""

    @abstractmethod
    def _save_weights(self, directory: Path) -> dict:
        """Write architecture-specific files; return settings needed to load them."""

    @classmethod
    @abstractmethod
    def _load(cls, directory: Path, settings: dict, standardisation: Standardisation,
              resources: LocalResources) -> RewardModel:
        """Rebuild from `_save_weights`'s files and settings, with what this machine provides."""

    # --- shared behaviour ---------------------------------------------------------------
    def trainable_parameters(self) -> int:
        """Number of parameters DP-SGD updates."""
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def pair_dataset(self, pairs: Sequence[PreferencePair]) -> TensorDataset:
        """(chosen side inputs..., rejected side inputs...) per pair: the DP trainer's contract."""
        images = [p.image_path for p in pairs]
        prompts = [p.prompt for p in pairs]
        chosen = self.side_inputs(images, prompts, [p.chosen for p in pairs])
        rejected = self.side_inputs(images, prompts, [p.rejected for p in pairs])
        return TensorDataset(*chosen, *rejected)

    @torch.no_grad()
    def raw_scores(self, images: Sequence[ImageInput], prompts: Sequence[str], responses: Sequence[str],
                   *, batch_size: int = 256) -> torch.Tensor:
        """Unstandardised scores, computed in eval mode and in batches."""
        if not (len(images) == len(prompts) == len(responses)):
            raise ValueError(f"images, prompts and responses differ in length: "
                             f"{len(images)}, {len(prompts)}, {len(responses)}")
        self.module.eval()
        out = [self.module(*self.side_inputs(images[i:i + batch_size], prompts[i:i + batch_size],
                                            responses[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, images: Sequence[ImageInput], prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Standardised scores: what leaves the silo."""
        raw = self.raw_scores(images, prompts, responses)
        return (raw - self.standardisation.mean) / self.standardisation.std

    def fit_standardisation(self, pairs: Sequence[PreferencePair]) -> Standardisation:
        """Set mean/std from raw scores of both answers of `pairs`.

        A silo passes public pairs (`silo_agent.training.public_standardisation_pairs`):
        a mean and std fitted on its private pairs would be served without DP noise.
        """
        if not pairs:
            raise ValueError("standardisation needs at least one pair")
        images = [p.image_path for p in pairs] * 2
        prompts = [p.prompt for p in pairs] * 2
        responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        raw = self.raw_scores(images, prompts, responses)
        # A floor on std keeps a constant scorer from exploding to inf after division.
        self.standardisation = Standardisation(mean=raw.mean().item(), std=max(raw.std().item(), 1e-6))
        return self.standardisation

    def pairwise_accuracy(self, pairs: Sequence[PreferencePair]) -> float:
        """Share of pairs where the chosen answer scores strictly higher."""
        if not pairs:
            return float("nan")
        images = [p.image_path for p in pairs]
        prompts = [p.prompt for p in pairs]
        chosen = self.raw_scores(images, prompts, [p.chosen for p in pairs])
        rejected = self.raw_scores(images, prompts, [p.rejected for p in pairs])
        return (chosen > rejected).float().mean().item()

    def save(self, directory: str | Path) -> Path:
        """Save weights and a manifest naming the architecture and standardisation."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        settings = self._save_weights(directory)
        manifest = {"architecture": self.architecture, "standardisation": asdict(self.standardisation),
                    "settings": settings}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        return directory


def load_reward_model(directory: str | Path, resources: LocalResources | None = None) -> RewardModel:
    """Load any registered architecture from a directory written by `RewardModel.save`.

    `resources` says where this machine keeps what the model needs but does
    not contain (see `LocalResources`); a lora_vlm model refuses to load
    without its base model, or with a different one.
    """
    # Importing the package registers every architecture.
    from mor_secure.models import reward_architectures  # noqa: F401

    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; not a saved reward model")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    name = manifest.get("architecture")
    if name not in _REGISTRY:
        raise ValueError(f"{manifest_path}: unknown architecture {name!r}; known: {', '.join(architectures())}")
    return _REGISTRY[name]._load(directory, manifest["settings"], Standardisation(**manifest["standardisation"]),
                                 resources or LocalResources())
