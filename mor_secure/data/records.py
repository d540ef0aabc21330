"""Plain record types shared by loaders, pair builders, importers and models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

QuestionKind = Literal["color", "shape", "yes_no"]
QUESTION_KINDS: tuple[QuestionKind, ...] = ("color", "shape", "yes_no")


@dataclass(frozen=True)
class VQARecord:
    """One question about one image, with its ground-truth answer.

    `image_id` is unique across every source split (e.g. "easyvqa-train/17"),
    so disjointness of splits can be checked on it directly.
    """

    image_id: str
    image_path: Path
    question: str
    answer: str
    kind: QuestionKind


@dataclass(frozen=True)
class PreferencePair:
    """A preference over two answers to one (image, prompt).

    `kind` is None for users' imported data whose question kind is unknown.
    `unit_id` is the privacy unit of imported data (e.g. a patient id), None
    when the image is the unit; `privacy_unit_of` says which applies.
    `label_flipped` records (for synthetic benchmark pairs only) that an
    unreliable annotator swapped chosen and rejected; evaluation always uses
    clean pairs.
    """

    image_id: str
    image_path: Path
    prompt: str
    chosen: str
    rejected: str
    kind: QuestionKind | None = None
    label_flipped: bool = False
    unit_id: str | None = None


def privacy_unit_of(pair: PreferencePair) -> str:
    """The DP unit a pair belongs to: its `unit_id` (a patient) if the data names one, else its image.

    The two are kept apart ("unit:" before a unit_id): a patient named like an
    image id would otherwise share a unit with that image's other rows.
    """
    return f"unit:{pair.unit_id}" if pair.unit_id is not None else pair.image_id
