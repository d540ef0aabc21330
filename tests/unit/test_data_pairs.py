"""Preference pairs: plausible same-kind rejections, and label noise only where configured."""

from __future__ import annotations

from pathlib import Path

import pytest

from mor_secure.data import (
    ANSWERS_BY_KIND,
    ConsortiumSpec,
    SiloDataSpec,
    VQARecord,
    count_by_kind,
    load_easyvqa,
    make_pairs,
    make_splits,
    pairs_for_silo,
    silo_seed,
)

# 3,000 questions: all kinds present, a few seconds at most.
RECORDS = load_easyvqa("train")[:3000]


def test_clean_pairs_prefer_the_true_answer_over_a_wrong_one_of_the_same_kind() -> None:
    pairs = make_pairs(RECORDS, seed=3)
    assert len(pairs) == len(RECORDS)
    for record, pair in zip(RECORDS, pairs, strict=True):
        assert (pair.image_id, pair.prompt, pair.chosen, pair.kind) == (
            record.image_id, record.question, record.answer, record.kind,
        )
        assert pair.rejected != pair.chosen
        assert pair.rejected in ANSWERS_BY_KIND[record.kind]
        assert not pair.label_flipped
    assert {p.rejected for p in pairs if p.chosen == "yes"} == {"no"}
    # Every wrong colour gets drawn: the rejection is not a fixed choice.
    assert {p.rejected for p in pairs if p.chosen == "red"} == set(ANSWERS_BY_KIND["color"]) - {"red"}


def test_pairs_are_deterministic_in_the_seed() -> None:
    assert make_pairs(RECORDS, seed=3) == make_pairs(RECORDS, seed=3)
    assert make_pairs(RECORDS, seed=3) != make_pairs(RECORDS, seed=4)


def test_flips_only_on_unreliable_kinds_at_about_the_configured_rate() -> None:
    pairs = make_pairs(RECORDS, seed=7, reliable_kinds=["shape"], label_flip_rate=0.3)
    assert not any(p.label_flipped for p in pairs if p.kind == "shape")
    for record, pair in zip(RECORDS, pairs, strict=True):
        if pair.label_flipped:
            assert pair.rejected == record.answer and pair.chosen != record.answer
        else:
            assert pair.chosen == record.answer
    unreliable = [p for p in pairs if p.kind != "shape"]
    flip_share = sum(p.label_flipped for p in unreliable) / len(unreliable)
    assert len(unreliable) > 2000
    assert flip_share == pytest.approx(0.3, abs=0.04)


def test_zero_rate_or_all_reliable_means_no_flips() -> None:
    no_rate = make_pairs(RECORDS, seed=1, reliable_kinds=["color"], label_flip_rate=0.0)
    assert not any(p.label_flipped for p in no_rate)
    assert not any(p.label_flipped for p in make_pairs(RECORDS, seed=1, label_flip_rate=0.5))
    with pytest.raises(ValueError, match="label_flip_rate"):
        make_pairs(RECORDS, seed=1, label_flip_rate=1.5)


def test_max_pairs_per_kind_keeps_a_seeded_subsample_in_order() -> None:
    full = make_pairs(RECORDS, seed=2)
    capped = make_pairs(RECORDS, seed=2, max_pairs_per_kind=50)
    assert count_by_kind(capped) == {"color": 50, "shape": 50, "yes_no": 50}
    positions = [full.index(pair) for pair in capped]
    assert positions == sorted(positions)
    assert make_pairs(RECORDS, seed=2, max_pairs_per_kind=50) == capped


def test_count_by_kind_lists_every_kind() -> None:
    record = VQARecord("x/1", Path("1.png"), "is there a circle?", "yes", "yes_no")
    assert count_by_kind(make_pairs([record], seed=0)) == {"color": 0, "shape": 0, "yes_no": 1}


def test_silo_pairs_use_the_silo_spec_and_a_stable_seed() -> None:
    spec = ConsortiumSpec(
        seed=0,
        silos=[
            SiloDataSpec(name="hospital-a", image_share=0.1, reliable_kinds=["shape"], label_flip_rate=0.5),
            SiloDataSpec(
                name="bank-b",
                image_share=0.1,
                reliable_kinds=["color"],
                label_flip_rate=0.2,
                max_pairs_per_kind=40,
            ),
        ],
    )
    splits = make_splits(spec)
    hospital = pairs_for_silo(splits, spec, "hospital-a")
    assert [p.image_id for p in hospital] == [r.image_id for r in splits.private["hospital-a"]]
    assert any(p.label_flipped for p in hospital)
    assert not any(p.label_flipped for p in hospital if p.kind == "shape")
    assert count_by_kind(pairs_for_silo(splits, spec, "bank-b")) == {"color": 40, "shape": 40, "yes_no": 40}
    # sha256-derived, so the value is the same in every process and on every machine.
    assert silo_seed(0, "hospital-a") == silo_seed(0, "hospital-a") != silo_seed(0, "bank-b")
    assert silo_seed(0, "hospital-a") == 0xA6BDC12BDA2CD200
    with pytest.raises(KeyError, match="known silos"):
        pairs_for_silo(splits, spec, "nobody")
