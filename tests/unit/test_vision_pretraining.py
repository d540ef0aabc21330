"""The vision warm-up before SFT: labels from the public questions, only the vision side trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.vision_pretraining import VisionPretrainingConfig, image_labels, pretrain_vision
from mor_secure.data.records import VQARecord
from mor_secure.models.tiny_vlm import load_vlm


def _record(image: str, kind: str, answer: str) -> VQARecord:
    return VQARecord(image_id=image, image_path=Path(image), question=f"{kind}?", answer=answer, kind=kind)


def test_image_labels_come_from_colour_and_shape_questions_only() -> None:
    records = [_record("a.png", "shape", "circle"), _record("a.png", "color", "red"),
               _record("b.png", "yes_no", "yes"), _record("c.png", "shape", "triangle")]
    assert image_labels(records) == {"color": {"a.png": "red"}, "shape": {"a.png": "circle", "c.png": "triangle"}}


def test_warm_up_trains_the_vision_tower_only(tiny_vlm_dir: Path, consortium) -> None:
    _, splits = consortium
    model, processor = load_vlm(tiny_vlm_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = pretrain_vision(model, processor, splits.sft, VisionPretrainingConfig(steps=3, batch_size=8),
                           progress=False)
    assert loss > 0
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(".vision_tower." in name for name in changed)
    assert not [name for name in changed if ".vision_tower." not in name]


def test_warm_up_lowers_the_classification_loss(tiny_vlm_dir: Path, consortium) -> None:
    _, splits = consortium
    # Two images of different shapes: the loss can only fall if the tower learns to tell them apart.
    by_shape = {r.answer: r for r in splits.sft if r.kind == "shape"}
    two_images = [by_shape["circle"], by_shape["triangle"]]
    model, processor = load_vlm(tiny_vlm_dir)
    first = pretrain_vision(model, processor, two_images, VisionPretrainingConfig(steps=1), progress=False)
    model, processor = load_vlm(tiny_vlm_dir)
    last = pretrain_vision(model, processor, two_images, VisionPretrainingConfig(steps=30), progress=False)
    assert last < 0.5 * first


def test_warm_up_without_labelled_questions_says_how_to_skip(tiny_vlm_dir: Path) -> None:
    model, processor = load_vlm(tiny_vlm_dir)
    with pytest.raises(ValueError, match="vision_pretraining.steps: 0"):
        pretrain_vision(model, processor, [_record("b.png", "yes_no", "yes")], VisionPretrainingConfig(steps=1),
                        progress=False)
