"""The consortium's data layout: which easy-VQA images go where, and how noisy each silo is.

The benchmark's point (DESIGN.md section 2) is heterogeneity: each silo
labels one question kind reliably and the others noisily, so no single
reward model is good everywhere and the router has something to learn. This
file is the one place that says so, validated strictly so a typo in the YAML
fails loudly instead of silently changing an experiment.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from mor_secure.config import StrictModel, load_config
from mor_secure.data.easyvqa import EASYVQA_TEST_IMAGES, EASYVQA_TRAIN_IMAGES
from mor_secure.data.records import QuestionKind
from mor_secure.pki.identity import PartyIdentity, Role

# Names of the shared splits; a silo may not take one, since split names and
# silo names share one namespace in `ConsortiumSplits.image_ids`.
SHARED_SPLIT_NAMES: tuple[str, ...] = ("sft", "calibration", "dev", "test")

# Shares like 0.33 are written in decimal but summed in binary floating point.
_SHARE_SUM_TOLERANCE = 1e-9


def _certifiable_name(role: Role) -> AfterValidator:
    """A check that a party name is one its certificate can carry: the PKI's own rule, never a copy of it."""

    def check(name: str) -> str:
        return PartyIdentity(role, name).name  # ValueError saying the rule otherwise

    return AfterValidator(check)


class UnknownNameError(KeyError):
    """A silo or split the consortium does not have; the message names the ones it has."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError's own str() would print the message in quotes


class SplitSpec(StrictModel):
    """Sizes of the shared splits, in images; the silos' private pool is what remains.

    sft, calibration and the silos come from the easy-VQA train images; dev
    and test from its test images. Dev is for probes and tuning (in-training
    accuracy checks, choosing settings); test is read only by final
    reporting, so a number in a results table was never used to pick
    anything that produced it.
    """

    sft_images: int = Field(
        default=1200,
        gt=0,
        description="easy-VQA train images for supervised fine-tuning of the base VLM.",
    )
    calibration_images: int = Field(
        default=400,
        gt=0,
        description="easy-VQA train images for the coordinator's public calibration set (router training).",
    )
    dev_images: int = Field(
        default=300,
        gt=0,
        description=(
            "easy-VQA test images held out for probes and tuning (a seeded draw); never "
            "reported as a final result. The test split is the test images that remain."
        ),
    )
    test_images: int | None = Field(
        default=None,
        gt=0,
        description=(
            "easy-VQA test images for final reporting, drawn from those dev leaves: null means "
            f"all {EASYVQA_TEST_IMAGES} - dev_images; a number picks a seeded subset of that many."
        ),
    )

    @model_validator(mode="after")
    def _leave_a_private_pool(self) -> SplitSpec:
        shared = self.sft_images + self.calibration_images
        if shared >= EASYVQA_TRAIN_IMAGES:
            raise ValueError(
                f"sft_images + calibration_images = {shared} leaves no private images for the "
                f"silos (easy-VQA has {EASYVQA_TRAIN_IMAGES} train images); lower them so their "
                f"sum is below {EASYVQA_TRAIN_IMAGES}"
            )
        return self

    @model_validator(mode="after")
    def _dev_and_test_fit(self) -> SplitSpec:
        if self.dev_images >= EASYVQA_TEST_IMAGES:
            raise ValueError(
                f"dev_images = {self.dev_images} leaves no test images (easy-VQA has "
                f"{EASYVQA_TEST_IMAGES} test images, shared by dev and test); lower dev_images "
                f"below {EASYVQA_TEST_IMAGES}"
            )
        if self.test_images is not None and self.dev_images + self.test_images > EASYVQA_TEST_IMAGES:
            raise ValueError(
                f"dev_images + test_images = {self.dev_images} + {self.test_images} = "
                f"{self.dev_images + self.test_images} > {EASYVQA_TEST_IMAGES} easy-VQA test images "
                f"(dev and test are drawn from them, disjoint); lower one of them, or set "
                f"test_images: null to test on all {self.test_pool_images} that dev leaves"
            )
        return self

    @property
    def test_pool_images(self) -> int:
        """easy-VQA test images left for the test split after dev."""
        return EASYVQA_TEST_IMAGES - self.dev_images

    @property
    def private_pool_images(self) -> int:
        """Images left for the silos after the shared splits."""
        return EASYVQA_TRAIN_IMAGES - self.sft_images - self.calibration_images


class SiloDataSpec(StrictModel):
    """One silo's slice of the private pool and the quality of its labels."""

    name: Annotated[str, _certifiable_name(Role.SILO)] = Field(
        description="Silo name, the same as in its certificate (mor://silo/<name>): 1-63 lower-case letters, "
                    "digits or '-', starting and ending with a letter or digit.",
    )
    image_share: float = Field(
        gt=0.0,
        le=1.0,
        description="Share of the private image pool this silo holds (0 < share <= 1).",
    )
    reliable_kinds: list[QuestionKind] = Field(
        min_length=1,
        description="Question kinds this silo labels correctly: its domain of expertise.",
    )
    label_flip_rate: float = Field(
        ge=0.0,
        le=0.5,
        description=(
            "Probability that a pair on a kind NOT in reliable_kinds has chosen and rejected "
            "swapped (0 = clean, 0.5 = pure noise)."
        ),
    )
    max_pairs_per_kind: int | None = Field(
        default=None,
        gt=0,
        description="Cap on this silo's pairs per question kind (deterministic subsample); null = no cap.",
    )

    @model_validator(mode="after")
    def _unique_reliable_kinds(self) -> SiloDataSpec:
        if len(set(self.reliable_kinds)) != len(self.reliable_kinds):
            raise ValueError(f"silo {self.name!r}: reliable_kinds lists a kind twice: {self.reliable_kinds}")
        return self


class ConsortiumSpec(StrictModel):
    """The whole benchmark consortium: seed, shared splits and silos."""

    seed: int = Field(default=0, description="Seed of every split and pair draw; same seed, same data.")
    splits: SplitSpec = Field(default_factory=SplitSpec, description="Sizes of the shared splits.")
    silos: list[SiloDataSpec] = Field(
        min_length=1,
        description="The silos, in order; each takes consecutive images of the shuffled private pool.",
    )
    coordinator: Annotated[str, _certifiable_name(Role.COORDINATOR)] = Field(
        "coordinator", description="The coordinator's party name: its certificate says mor://coordinator/<name> "
        "(`mor pki init` issues it a kit); the same rule as a silo name.")
    auditors: list[Annotated[str, _certifiable_name(Role.AUDITOR)]] = Field(
        default_factory=lambda: ["auditor"], description="Compliance reviewers' party names "
        "(mor://auditor/<name>, the same rule as a silo name): they may read silo descriptions, never scores.")

    @model_validator(mode="after")
    def _silos_fit_together(self) -> ConsortiumSpec:
        names = [silo.name for silo in self.silos]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"silo names must be unique; repeated: {duplicates}")
        repeated_auditors = sorted({name for name in self.auditors if self.auditors.count(name) > 1})
        if repeated_auditors:
            raise ValueError(f"auditor names must be unique (each is one party with one kit); repeated: "
                             f"{repeated_auditors}")
        reserved = sorted(set(names) & set(SHARED_SPLIT_NAMES))
        if reserved:
            raise ValueError(f"silo names {reserved} are reserved for shared splits; rename the silos")
        share_sum = sum(silo.image_share for silo in self.silos)
        if share_sum > 1.0 + _SHARE_SUM_TOLERANCE:
            raise ValueError(
                f"silo image_share values sum to {share_sum:.6g} > 1; "
                "lower them so the silos fit in the private pool"
            )
        pool = self.splits.private_pool_images
        empty = [silo.name for silo in self.silos if silo_image_count(silo.image_share, pool) == 0]
        if empty:
            raise ValueError(
                f"silos {empty} would get no image from the private pool of {pool}; "
                "raise their image_share or shrink the shared splits"
            )
        return self

    def silo(self, name: str) -> SiloDataSpec:
        """The silo called `name`; KeyError naming the known silos otherwise."""
        for silo in self.silos:
            if silo.name == name:
                return silo
        raise UnknownNameError(f"no silo {name!r} in the consortium; known silos: {[s.name for s in self.silos]}")


def silo_image_count(image_share: float, pool_size: int) -> int:
    """floor(image_share * pool_size), robust to binary rounding (0.29 * 100 is 28.999...)."""
    return math.floor(image_share * pool_size + _SHARE_SUM_TOLERANCE)


def load_consortium(path: str | Path) -> ConsortiumSpec:
    """Load a consortium YAML; `ConfigError` naming the file on any problem."""
    return load_config(path, ConsortiumSpec)
