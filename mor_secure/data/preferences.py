"""Synthetic preference pairs from VQA records, with per-silo label noise.

A pair prefers the true answer over a plausible wrong one of the same kind
(another colour, another shape, the other of yes/no): a rejected answer of a
different kind would be trivially distinguishable and teach the reward model
nothing. Silos are made heterogeneous by annotator noise: on kinds outside a
silo's expertise, a share of pairs has chosen and rejected swapped. All
draws come from a seeded `random.Random`, so pairs are reproducible.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Collection, Iterable, Sequence

from mor_secure.data.consortium import ConsortiumSpec
from mor_secure.data.easyvqa import ANSWERS_BY_KIND
from mor_secure.data.records import QUESTION_KINDS, PreferencePair, QuestionKind, VQARecord
from mor_secure.data.splits import ConsortiumSplits


def make_pairs(
    records: Iterable[VQARecord],
    *,
    seed: int,
    reliable_kinds: Collection[QuestionKind] | None = None,
    label_flip_rate: float = 0.0,
    max_pairs_per_kind: int | None = None,
) -> tuple[PreferencePair, ...]:
    """One pair per record: chosen = true answer, rejected = a wrong answer of the same kind.

    `reliable_kinds=None` means every kind is reliable: clean pairs, as
    evaluation needs. On a kind outside `reliable_kinds`, each pair is
    flipped (chosen/rejected swapped, `label_flipped=True`) with probability
    `label_flip_rate`. `max_pairs_per_kind` keeps a seeded subsample of that
    many pairs per kind, in their original order.
    """
    if not 0.0 <= label_flip_rate <= 1.0:
        raise ValueError(f"label_flip_rate must be in [0, 1], got {label_flip_rate}")
    if max_pairs_per_kind is not None and max_pairs_per_kind <= 0:
        raise ValueError(f"max_pairs_per_kind must be positive or None, got {max_pairs_per_kind}")
    rng = random.Random(seed)
    pairs = []
    for record in records:
        wrong_answers = _wrong_answers(record)
        rejected = rng.choice(wrong_answers)
        # Draw the flip coin for every record, reliable or not, so the wrong
        # answers drawn do not depend on which kinds are reliable or on the rate.
        flip = rng.random() < label_flip_rate
        if reliable_kinds is not None and record.kind not in reliable_kinds and flip:
            chosen, rejected, flipped = rejected, record.answer, True
        else:
            chosen, flipped = record.answer, False
        pairs.append(
            PreferencePair(
                image_id=record.image_id,
                image_path=record.image_path,
                prompt=record.question,
                chosen=chosen,
                rejected=rejected,
                kind=record.kind,
                label_flipped=flipped,
            )
        )
    if max_pairs_per_kind is not None:
        pairs = _subsample_per_kind(pairs, max_pairs_per_kind, rng)
    return tuple(pairs)


def pairs_for_silo(splits: ConsortiumSplits, spec: ConsortiumSpec, silo_name: str) -> tuple[PreferencePair, ...]:
    """The noisy training pairs of one silo, from its private records and its spec."""
    silo = spec.silo(silo_name)
    return make_pairs(
        splits.private[silo_name],
        seed=silo_seed(spec.seed, silo_name),
        reliable_kinds=silo.reliable_kinds,
        label_flip_rate=silo.label_flip_rate,
        max_pairs_per_kind=silo.max_pairs_per_kind,
    )


def silo_seed(consortium_seed: int, silo_name: str) -> int:
    """A per-silo seed, stable across processes (built-in hash() is salted per process)."""
    digest = hashlib.sha256(f"{consortium_seed}/{silo_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def count_by_kind(pairs: Iterable[PreferencePair]) -> dict[QuestionKind | None, int]:
    """Pairs per kind; every known kind is a key (0 if absent), None only for unlabelled imports."""
    counts: dict[QuestionKind | None, int] = dict.fromkeys(QUESTION_KINDS, 0)
    counts.update(Counter(pair.kind for pair in pairs))
    return counts


def _wrong_answers(record: VQARecord) -> tuple[str, ...]:
    answers = ANSWERS_BY_KIND[record.kind]
    if record.answer not in answers:
        raise ValueError(
            f"{record.image_id}: answer {record.answer!r} is not a {record.kind} answer {answers}"
        )
    return tuple(answer for answer in answers if answer != record.answer)


def _subsample_per_kind(
    pairs: Sequence[PreferencePair], cap: int, rng: random.Random
) -> list[PreferencePair]:
    positions_by_kind: dict[QuestionKind, list[int]] = {}
    for position, pair in enumerate(pairs):
        positions_by_kind.setdefault(pair.kind, []).append(position)
    kept: set[int] = set()
    # Sorted kinds: the rng is consumed in the same order on every run.
    for kind in sorted(positions_by_kind):
        positions = positions_by_kind[kind]
        kept.update(positions if len(positions) <= cap else rng.sample(positions, cap))
    return [pair for position, pair in enumerate(pairs) if position in kept]
