"""Splits are deterministic, image-disjoint, and keep every question of an image together."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import pytest

from mor_secure.data import ConsortiumSpec, SiloDataSpec, SplitSpec, kind_of_answer, load_easyvqa, make_splits


def _spec(seed: int = 0, test_images: int | None = None, dev_images: int = 300) -> ConsortiumSpec:
    return ConsortiumSpec(
        seed=seed,
        splits=SplitSpec(sft_images=1200, calibration_images=400, dev_images=dev_images, test_images=test_images),
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
    assert len(splits.image_ids("dev")) == 300
    assert len(splits.image_ids("test")) == 700  # the 1000 easy-VQA test images that dev leaves
    # floor(0.33 * 2400) = 792 images per silo.
    assert {name: len(splits.image_ids(name)) for name in splits.private} == {
        "hospital-a": 792, "bank-b": 792, "hospital-c": 792,
    }
    assert splits.all_split_names() == ("sft", "calibration", "dev", "test", "hospital-a", "bank-b", "hospital-c")
    assert splits.records("dev") == splits.dev and splits.records("test") == splits.test
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
    assert all(image_id.startswith("easyvqa-test/") for name in ("dev", "test") for image_id in splits.image_ids(name))
    train_side = [image_id for name in names if name not in ("dev", "test") for image_id in splits.image_ids(name)]
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


@pytest.mark.parametrize("test_images", [None, 300])
def test_dev_is_disjoint_from_every_other_split(test_images: int | None) -> None:
    splits = make_splits(_spec(test_images=test_images))
    dev = splits.image_ids("dev")
    assert len(dev) == 300
    for name in splits.all_split_names():
        if name != "dev":
            assert not dev & splits.image_ids(name), name
    if test_images is None:  # dev and test together are all of easy-VQA's test images
        assert len(dev | splits.image_ids("test")) == 1000


def test_same_spec_same_dev_and_different_seed_different_dev() -> None:
    first = make_splits(_spec(seed=0))
    assert make_splits(_spec(seed=0)).dev == first.dev
    assert make_splits(_spec(seed=5)).image_ids("dev") != first.image_ids("dev")


def test_dev_images_changes_only_dev_and_test() -> None:
    """Dev is drawn after the train shuffle: resizing it never moves an sft, calibration or silo image."""
    small, large = make_splits(_spec(dev_images=100)), make_splits(_spec(dev_images=400))
    assert (small.sft, small.calibration, dict(small.private)) == (large.sft, large.calibration, dict(large.private))
    assert len(small.image_ids("dev")) == 100 and len(large.image_ids("dev")) == 400
    assert len(small.image_ids("test")) == 900 and len(large.image_ids("test")) == 600
    assert small.image_ids("dev") | small.image_ids("test") == large.image_ids("dev") | large.image_ids("test")


def test_dev_and_test_must_fit_in_the_easyvqa_test_images() -> None:
    with pytest.raises(ValueError, match=r"dev_images \+ test_images = 300 \+ 800 = 1100 > 1000.*test_images: null"):
        SplitSpec(dev_images=300, test_images=800)
    with pytest.raises(ValueError, match="lower dev_images below 1000"):
        SplitSpec(dev_images=1000)
    with pytest.raises(ValueError, match="dev_images"):
        SplitSpec(dev_images=0)
    assert SplitSpec(dev_images=300, test_images=700).test_pool_images == 700
