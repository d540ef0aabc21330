"""Settings of a reward-model training run: optimisation, and the DP guarantee it must meet.

Secure defaults, Opacus style: DP on, per-image privacy unit, noise from OS
entropy; every way to weaken them is a named field that warns loudly.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, model_validator

from mor_secure.config import StrictModel
from mor_secure.privacy.accounting import Accountant
from mor_secure.privacy.ledger_units import GUARANTEE_UNIT
from mor_secure.weakened_privacy import warn_weakened_privacy

PrivacyUnit = Literal["image", "pair"]
# What a run's unit_ids name under privacy_unit: image: images (the benchmark's), or patients (a silo's own data,
# `data.unit`). A per-patient epsilon is no per-image one (removing one image of a patient with several is covered
# only as a substitution: accounted directly, 15.6 for hospital-a's demo setting at epsilon 8), so reports and ledger
# charges name the one the run had.
UnitKind = Literal["image", "patient"]
# What per-pair DP says of a unit (a patient, an image) with several pairs. Dwork & Roth's k x epsilon (2014,
# Thm 2.2) is for pure DP only; for (epsilon, delta)-DP the same induction over the k changed pairs gives
# (k eps, delta (1 + e^eps + ... + e^((k-1) eps))), whose delta at epsilon 8 and k = 2 is already
# (1 + e^8) x 1e-5, about 0.03: no guarantee.
PER_PAIR_UNITS = ("a unit with k > 1 pairs has no stated guarantee (group privacy for (epsilon, delta)-DP bounds it "
                  "only at k x epsilon with delta multiplied by 1 + e^epsilon + ... + e^((k-1) x epsilon): none at "
                  "epsilon 8)")
GuaranteeUnit = Literal["image", "patient", "pair"]
# Where the DP noise came from, as every report and ledger entry states it.
NOISE_OS_ENTROPY = "os-entropy: torch generators seeded from os.urandom on every run"
NOISE_SECURE_MODE = "secure-mode: Opacus CSPRNG (torchcsprng, /dev/urandom)"
NOISE_SEEDED = "seeded: not private"


class DPConfig(StrictModel):
    """Differential-privacy settings of one training run. On by default."""

    enabled: bool = Field(
        True,
        description="Train with DP-SGD. Turn off only for public or synthetic data: "
        "without DP the weights and scores can leak the training pairs.",
    )
    target_epsilon: float = Field(
        8.0,
        gt=0,
        allow_inf_nan=False,
        description="Epsilon the whole run may spend; the noise multiplier is chosen to meet it.",
    )
    target_delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description="Delta of the guarantee; delta >= 1 / number of privacy units would allow publishing a whole "
        "unit, so it is refused: against public_unit_count when the config is read, else against the actual count "
        "before training (with public_unit_count, the actual count is only warned of); keep it well below that.",
    )
    max_grad_norm: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="Per-unit gradient clipping bound C (the L2 sensitivity of one step).",
    )
    privacy_unit: PrivacyUnit = Field(
        "image",
        description="What one DP sample is. 'image': all pairs of one unit (the data's unit_id, e.g. a patient "
        "id, or else the image) give one clipped gradient, so the guarantee is per patient/image. 'pair': each "
        f"preference pair is a unit, and {PER_PAIR_UNITS}.",
    )
    max_pairs_per_unit: int | None = Field(
        16,
        gt=0,
        description="privacy_unit 'image' only: keep a seeded sample of at most this many pairs per unit "
        "(bounds padding and memory; easy-VQA has 2-21 questions per image, 9.6 on average). null = keep all.",
    )
    public_unit_count: int | None = Field(
        None,
        gt=0,
        description="The number of privacy units the run is planned for: a number you may publish (your patient "
        "count, rounded). The sample rate 1 / ceil(public_unit_count / batch_size), the steps and the noise follow "
        "from it alone, so the report, which publishes them, says nothing of who is in the data; each unit still "
        "joins each batch with that probability, however many there are. Whether a model is released does not "
        "depend on the actual count either: a target_delta not below 1 / public_unit_count is refused, and a "
        "batch_size or target_delta the actual count makes unsound is only warned of, locally. null = planned from "
        "the actual number of units, which the report then gives away to within one batch, and a unit whose "
        "presence moves that number across a multiple of batch_size changes the published schedule, which epsilon "
        "does not cover: for public benchmark data only (a silo's own data, `data:`, must set it).",
    )
    secure_mode: bool = Field(
        False,
        description="Opacus secure_mode: noise and sampling from a CSPRNG, with the floating-point-attack "
        "mitigation (Holohan et al. 2021). Needs the torchcsprng package. Without it the noise comes from "
        "torch generators seeded from OS entropy on every run (never from `seed`).",
    )
    insecure_seeded_noise: int | None = Field(
        None,
        description="SIMULATION ONLY: seed the DP noise and Poisson sampling with this number. Whoever knows "
        "it can regenerate the noise, so the run is NOT private; it warns, and its report and ledger entry "
        "say 'noise seeded: not private'. Never set it for real data.",
    )
    accountant: Accountant = Field(
        "prv",
        description="Privacy accountant: 'prv' (tight numerical composition) or 'rdp' (Renyi DP bound).",
    )

    def planned_units(self, actual: int) -> int:
        """The number of units a run over `actual` units is planned for: public_unit_count when set."""
        return self.public_unit_count if self.public_unit_count is not None else actual

    @model_validator(mode="after")
    def _delta_below_one_over_the_public_count(self) -> DPConfig:
        # Dwork & Roth 2014, section 2.3: delta >= 1/n lets about one whole unit out in the clear. Checked here
        # against the public count, so that the refusal depends on nothing private (dp_training._check_unit_count).
        if self.enabled and self.public_unit_count is not None and self.target_delta >= 1 / self.public_unit_count:
            raise ValueError(f"target_delta ({self.target_delta:g}) must be below 1/public_unit_count = "
                             f"{1 / self.public_unit_count:.3g} (with delta >= 1/n the guarantee allows publishing "
                             "a whole unit in the clear); lower target_delta (1/n^1.1 or less is usual)")
        return self

    @model_validator(mode="after")
    def _check_noise_source(self) -> DPConfig:
        if self.secure_mode and self.insecure_seeded_noise is not None:
            raise ValueError("secure_mode and insecure_seeded_noise contradict each other: a CSPRNG cannot be "
                             "seeded; remove insecure_seeded_noise")
        if self.secure_mode and importlib.util.find_spec("torchcsprng") is None:
            raise ValueError(
                "secure_mode needs the torchcsprng package (Opacus' CSPRNG), which is not installed; it has no "
                "build for this torch (2.13) on PyPI. Set secure_mode: false (noise is then seeded from OS "
                "entropy on every run), or, in production, install torchcsprng built for your torch "
                "(docs/silo-operator.md, 'Noise')")
        if self.enabled and self.insecure_seeded_noise is not None:
            warn_weakened_privacy(f"DP noise is SEEDED (insecure_seeded_noise={self.insecure_seeded_noise}): anyone "
                                  "who knows the seed can remove it, so this run is NOT private; for simulations only")
        return self

    @model_validator(mode="after")
    def _warn_when_weakened(self) -> DPConfig:
        if not self.enabled:
            warn_weakened_privacy(
                "DP is OFF: the reward model will be trained without differential privacy, so its "
                "weights and scores can reveal individual training pairs; never use for data that must stay private"
            )
        elif self.privacy_unit == "pair":
            warn_weakened_privacy(
                f"privacy_unit is 'pair': the DP guarantee is per preference pair, NOT per patient/image: "
                f"{PER_PAIR_UNITS}; set privacy_unit: image unless every patient has one pair"
            )
        return self


class TrainingConfig(StrictModel):
    """Optimisation settings of one reward-model training run."""

    epochs: int = Field(20, gt=0, description="Passes over the data (in expectation, under Poisson sampling).")
    batch_size: int = Field(
        256,
        gt=0,
        description="Expected batch size, in privacy units. With DP each unit joins each batch independently "
        "with probability sample_rate = 1 / ceil(n / batch_size) (Poisson sampling), n being dp.public_unit_count "
        "(or the actual number of units without it), which is batch_size / n when batch_size divides n. Must be "
        "smaller than n.",
    )
    learning_rate: float = Field(2e-3, gt=0, allow_inf_nan=False, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="Adam weight decay.")
    seed: int = Field(0, description="Seed of weight initialisation, data order and the per-unit cap's sample. "
                      "Never of the DP noise or Poisson sampling (see dp.insecure_seeded_noise).")
    dp: DPConfig = Field(default_factory=DPConfig, description="Differential-privacy settings.")

    @model_validator(mode="after")
    def _batch_below_public_count(self) -> TrainingConfig:
        if self.dp.public_unit_count is not None and self.batch_size >= self.dp.public_unit_count:
            raise ValueError(f"batch_size ({self.batch_size}) must be smaller than dp.public_unit_count "
                             f"({self.dp.public_unit_count}); lower batch_size")
        return self


def noise_label(dp: DPConfig) -> str:
    """The noise source of a run under `dp`, as reports and ledger entries state it."""
    if dp.secure_mode:
        return NOISE_SECURE_MODE
    return NOISE_SEEDED if dp.insecure_seeded_noise is not None else NOISE_OS_ENTROPY


def guarantee_unit_of(dp: DPConfig, *, units_are: UnitKind) -> GuaranteeUnit:
    """What one unit of a DP-SGD run's guarantee is: a pair, or what its unit_ids name (`units_are`)."""
    return "pair" if dp.privacy_unit == "pair" else units_are


def run_declaration(dp: DPConfig, *, units_are: UnitKind = "image") -> dict[str, str]:
    """What a DP-SGD run under `dp` declares in its ledger reservation: the ledger reads a charge's unit and
    noise from there (`PrivacyLedger.check_open` holds the run to it)."""
    return {"mechanism": "dp-sgd", "privacy_unit": dp.privacy_unit,
            GUARANTEE_UNIT: guarantee_unit_of(dp, units_are=units_are), "noise": noise_label(dp)}
