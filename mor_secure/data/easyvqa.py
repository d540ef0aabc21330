"""easy-VQA as `VQARecord`s: the benchmark every demo and test runs on.

easy-VQA (Victor Zhou, MIT licence, https://github.com/vzhou842/easy-VQA) is a
synthetic VQA set of 64x64 PNG images, each showing one coloured shape, with
questions about its colour, its shape, or yes/no facts. It ships inside the
`easy_vqa` package, so it works offline: 4,000 train images (38,575
questions) and 1,000 test images (9,673 questions).

The three answer families give the benchmark its silo "domains": the kind of
a question is derived from its answer, which is exact because the three
answer sets are disjoint.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import easy_vqa

from mor_secure.data.records import QuestionKind, VQARecord

EasyVQASource = Literal["train", "test"]

ANSWERS_BY_KIND: dict[QuestionKind, tuple[str, ...]] = {
    "color": ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow"),
    "shape": ("circle", "rectangle", "triangle"),
    "yes_no": ("no", "yes"),
}

# Image counts of the shipped package; split sizes are validated against them
# before any file is read.
EASYVQA_TRAIN_IMAGES = 4000
EASYVQA_TEST_IMAGES = 1000

_KIND_BY_ANSWER: dict[str, QuestionKind] = {
    answer: kind for kind, answers in ANSWERS_BY_KIND.items() for answer in answers
}


def kind_of_answer(answer: str) -> QuestionKind:
    """The question kind an easy-VQA answer belongs to; ValueError for an unknown answer."""
    try:
        return _KIND_BY_ANSWER[answer]
    except KeyError:
        raise ValueError(
            f"unknown easy-VQA answer {answer!r}; known answers: {sorted(_KIND_BY_ANSWER)}"
        ) from None


@lru_cache(maxsize=2)
def load_easyvqa(source: EasyVQASource) -> tuple[VQARecord, ...]:
    """Every question of the easy-VQA `source` split, in file order.

    Cached: the records are immutable and every split, pair builder and
    evaluation reads the same ones.
    """
    if source == "train":
        texts, answers, image_numbers = easy_vqa.get_train_questions()
        image_paths = easy_vqa.get_train_image_paths()
    elif source == "test":
        texts, answers, image_numbers = easy_vqa.get_test_questions()
        image_paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-VQA source must be 'train' or 'test', got {source!r}")
    return tuple(
        VQARecord(
            image_id=f"easyvqa-{source}/{image_number}",
            image_path=Path(image_paths[image_number]),
            question=text,
            answer=answer,
            kind=kind_of_answer(answer),
        )
        for text, answer, image_number in zip(texts, answers, image_numbers, strict=True)
    )
