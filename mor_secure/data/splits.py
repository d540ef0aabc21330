"""Deterministic, image-disjoint splits of easy-VQA for one consortium.

Splitting by image, never by question, is what keeps the splits honest: the
same image under two questions in two splits would leak a silo's private data
into calibration or test. Everything is drawn from `random.Random(spec.seed)`
(never the global RNG), so every party that reads the same consortium YAML
derives the same splits without exchanging them.

Two held-out splits come from the easy-VQA test images: `dev`, for probes and
tuning (in-training accuracy checks, picking settings), and `test`, read only
by final reporting. Keeping them apart is what lets a reported number be an
honest estimate: nothing reported on test was chosen by looking at test.
Draw order is fixed: the train images are shuffled first (sft, calibration,
silos), then dev is drawn, then the test subset, so adding or resizing dev
never moves an sft, calibration or silo image.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

from mor_secure.data.consortium import SHARED_SPLIT_NAMES, ConsortiumSpec, UnknownNameError, silo_image_count
from mor_secure.data.easyvqa import load_easyvqa
from mor_secure.data.records import VQARecord

# A process rarely holds more than a few consortium specs (demo, tests).
_SPLITS_CACHE_SIZE = 8


@dataclass(frozen=True)
class ConsortiumSplits:
    """Records of each split; `private` maps silo name -> that silo's records.

    `private` is a read-only mapping because results are cached and shared.
    """

    sft: tuple[VQARecord, ...]
    calibration: tuple[VQARecord, ...]
    dev: tuple[VQARecord, ...]
    """Held-out records for probes and tuning; never in a final table."""
    test: tuple[VQARecord, ...]
    """Held-out records read only by final reporting."""
    private: Mapping[str, tuple[VQARecord, ...]]

    def all_split_names(self) -> tuple[str, ...]:
        """"sft", "calibration", "dev", "test", then the silo names in consortium order."""
        return (*SHARED_SPLIT_NAMES, *self.private)

    def records(self, split_name: str) -> tuple[VQARecord, ...]:
        """Records of a shared split or of a silo; KeyError naming the known splits otherwise."""
        shared = {"sft": self.sft, "calibration": self.calibration, "dev": self.dev, "test": self.test}
        if split_name in shared:
            return shared[split_name]
        if split_name in self.private:
            return self.private[split_name]
        raise UnknownNameError(f"no split {split_name!r}; known splits: {list(self.all_split_names())}")

    def image_ids(self, split_name: str) -> frozenset[str]:
        """The distinct image ids of a shared split or of a silo."""
        return frozenset(record.image_id for record in self.records(split_name))


def make_splits(spec: ConsortiumSpec) -> ConsortiumSplits:
    """The splits of `spec`, cached per spec (keyed by its JSON, since specs are mutable)."""
    return _make_splits_from_json(spec.model_dump_json())


@lru_cache(maxsize=_SPLITS_CACHE_SIZE)
def _make_splits_from_json(spec_json: str) -> ConsortiumSplits:
    spec = ConsortiumSpec.model_validate_json(spec_json)
    rng = random.Random(spec.seed)
    train = load_easyvqa("train")
    test = load_easyvqa("test")

    # Sort before shuffling: the shuffle result must not depend on file order.
    train_images = sorted({record.image_id for record in train}, key=_image_number)
    rng.shuffle(train_images)
    sft_end = spec.splits.sft_images
    calibration_end = sft_end + spec.splits.calibration_images
    split_of_image = {image_id: "sft" for image_id in train_images[:sft_end]}
    split_of_image.update({image_id: "calibration" for image_id in train_images[sft_end:calibration_end]})

    pool = train_images[calibration_end:]
    start = 0
    for silo in spec.silos:
        end = start + silo_image_count(silo.image_share, len(pool))
        split_of_image.update({image_id: silo.name for image_id in pool[start:end]})
        start = end

    # Drawn after the train shuffle, so dev leaves sft, calibration and the silos unchanged.
    held_out_images = sorted({record.image_id for record in test}, key=_image_number)
    dev_images = frozenset(rng.sample(held_out_images, spec.splits.dev_images))
    test_images = [image_id for image_id in held_out_images if image_id not in dev_images]
    if spec.splits.test_images is not None:
        test_images = rng.sample(test_images, spec.splits.test_images)
    kept_test_images = frozenset(test_images)

    private = {silo.name: _records_in(train, split_of_image, silo.name) for silo in spec.silos}
    return ConsortiumSplits(
        sft=_records_in(train, split_of_image, "sft"),
        calibration=_records_in(train, split_of_image, "calibration"),
        dev=tuple(record for record in test if record.image_id in dev_images),
        test=tuple(record for record in test if record.image_id in kept_test_images),
        private=MappingProxyType(private),
    )


def _records_in(
    records: Iterable[VQARecord], split_of_image: Mapping[str, str], split_name: str
) -> tuple[VQARecord, ...]:
    """Every record whose image belongs to `split_name`, in file order."""
    return tuple(record for record in records if split_of_image.get(record.image_id) == split_name)


def _image_number(image_id: str) -> int:
    """17 for "easyvqa-train/17": numeric order, so "10" sorts after "9"."""
    return int(image_id.rsplit("/", 1)[1])
