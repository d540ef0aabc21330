"""A fake reward model and image bytes for the SiloClient suite (the suite is about the code around the model)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from mor_secure.models.reward_model import LocalResources, RewardModel, Standardisation


class RightAnswerModel(RewardModel):
    """Raw score 1 for the response "right", 0 otherwise; counts how often it is asked.

    A fake model: the suite is about the code around it (validation, limits,
    randomized response, transport), which must behave the same on every path.
    """

    architecture = "test_right_answer"

    def __init__(self) -> None:
        super().__init__(nn.Identity(), Standardisation(mean=0.5, std=0.5))
        self.calls = 0

    def side_inputs(self, images, prompts, responses):
        self.calls += 1
        return (torch.tensor([1.0 if r == "right" else 0.0 for r in responses]),)

    def _save_weights(self, directory: Path) -> dict:
        return {}

    @classmethod
    def _load(cls, directory: Path, settings: dict, standardisation: Standardisation,
              resources: LocalResources) -> RightAnswerModel:
        return cls()


def png(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()
