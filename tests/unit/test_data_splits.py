"""Splits are deterministic, image-disjoint, and keep every question of an image together."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import pytest

from mor_secure.data import ConsortiumSpec, SiloDataSpec, SplitSpec, kind_of_answer, load_easyvqa, make_splits


def _spec(seed: int = 0, test_images: int | None = None) -> ConsortiumSpec:
    return ConsortiumSpec(
        seed=seed,
        splits=SplitSpec(sft_images=1200, calibration_images=400, test_images=test_images),
        silos=[
            SiloDataSpec(name="hospital-a", image_share=0.33, reliable_kinds=["shape"], label_flip_rate=0.4),
            SiloDataSpec(name="bank-b", image_share=0.33, reliable_kinds=["color"], label_flip_rate=0.4),
            SiloDataSpec(name="hospital-c", image_share=0.33, reliable_kinds=["yes_no"], label_flip_rate=0.4),
        ],
    )


def test_easyvqa_loads_the_shipped_benchmark() -> None:
    train, test = load_easyvqa("train"), load_easyvqa("test")
    assert (len(train), len(test)) == (38575, 9673)
    assert len({r.image_id for r in train}) == 4000 and len({r.image_id for r in test}) == 1000
    first = train[0]
    assert (first.image_id, first.question, first.answer, first.kind) == (
        "easyvqa-train/0", "what is the blue shape?", "rectangle", "shape",
    )
    assert first.image_path.name == "0.png" and first.image_path.is_file()
    assert kind_of_answer("teal") == "color" and kind_of_answer("no") == "yes_no"
    with pytest.raises(ValueError, match="unknown easy-VQA answer 'purple'"):
        kind_of_answer("purple")


def test_split_sizes_follow_the_spec() -> None:
    splits = make_splits(_spec())
    assert len(splits.image_ids("sft")) == 1200
    assert len(splits.image_ids("calibration")) == 400
    assert len(splits.image_ids("test")) == 1000
    # floor(0.33 * 2400) = 792 images per silo.
    assert {name: len(splits.image_ids(name)) for name in splits.private} == {
        "hospital-a": 792, "bank-b": 792, "hospital-c": 792,
    }
    assert splits.all_split_names() == ("sft", "calibration", "test", "hospital-a", "bank-b", "hospital-c")
    with pytest.raises(KeyError, match="known splits"):
        splits.image_ids("nowhere")


def test_same_seed_same_splits_and_different_seed_different_splits() -> None:
    first, again, other = make_splits(_spec(seed=0)), make_splits(_spec(seed=0)), make_splits(_spec(seed=1))
    assert again.sft == first.sft and dict(again.private) == dict(first.private)
    assert other.image_ids("sft") != first.image_ids("sft")
    assert other.image_ids("hospital-a") != first.image_ids("hospital-a")


def test_no_image_is_in_two_splits() -> None:
    splits = make_splits(_spec(test_images=300))
    names = splits.all_split_names()
    for left, right in combinations(names, 2):
        assert not splits.image_ids(left) & splits.image_ids(right), (left, right)
    assert all(image_id.startswith("easyvqa-test/") for image_id in splits.image_ids("test"))
    train_side = [image_id for name in names if name != "test" for image_id in splits.image_ids(name)]
    assert not any(image_id.startswith("easyvqa-test/") for image_id in train_side)


def test_every_question_of_an_image_lands_in_the_split_of_its_image() -> None:
    splits = make_splits(_spec(test_images=300))
    questions_per_image = Counter(r.image_id for r in (*load_easyvqa("train"), *load_easyvqa("test")))
    for name in splits.all_split_names():
        in_split = Counter(r.image_id for r in splits.records(name))
        assert all(in_split[image_id] == questions_per_image[image_id] for image_id in in_split), name


def test_test_subset_is_seeded_and_of_the_requested_size() -> None:
    subset = make_splits(_spec(seed=0, test_images=300)).image_ids("test")
    assert len(subset) == 300
    assert make_splits(_spec(seed=0, test_images=300)).image_ids("test") == subset
    assert make_splits(_spec(seed=5, test_images=300)).image_ids("test") != subset
