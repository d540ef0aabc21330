"""What a training run produces besides the model: a public privacy report and local diagnostics.

The split is the guarantee's boundary (DESIGN §4): only DP outputs leave a
silo. The report holds the mechanism's public parameters; the diagnostics hold
exact statistics of private data and are never released.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mor_secure.privacy.accounting import Accountant
from mor_secure.privacy.training_config import GuaranteeUnit


@dataclass(frozen=True)
class PrivacyReport:
    """The PUBLIC privacy report of a run: what it spent and how, nothing about the data.

    Enough to recompute the epsilon with `accounting.epsilon_spent`. The unit
    count is not in it, nor the expected batch size (which is the unit count
    times the sample rate); the sample rate is (the rate the accountant
    charged, `accounting.poisson_schedule`), planned with the steps and noise
    from `DPConfig.public_unit_count` when set, so that none of them depends
    on who is in the data (from the actual count otherwise, which they then
    give away to within one batch size: public benchmark data only). Loss values,
    exact counts and timings are in `LocalDiagnostics`, never here. Without
    DP, epsilon is infinite and delta is 1: no guarantee at all.
    """

    dp_enabled: bool
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    epochs: int
    max_grad_norm: float | None
    accountant: Accountant | None
    privacy_unit: GuaranteeUnit | None
    max_pairs_per_unit: int | None
    noise: str | None
    private: bool
    mechanisms: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mechanisms": list(self.mechanisms)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PrivacyReport:
        """The inverse of `to_dict`; unknown or missing keys are an error (a report is never guessed)."""
        names = {f.name for f in fields(cls)}
        if set(values) != names:
            raise ValueError(f"privacy report keys differ from PrivacyReport's: missing {sorted(names - set(values))}, "
                             f"unknown {sorted(set(values) - names)}")
        return cls(**{**values, "mechanisms": tuple(values["mechanisms"])})


@dataclass(frozen=True)
class LocalDiagnostics:
    """Facts about the private data and the run for the silo's own operators: NOT FOR RELEASE.

    Exact loss values and counts are functions of the private data with no
    DP noise: they stay on the silo's disk and are never sent over any interface.
    """

    loss_history: list[float]
    seconds: float
    pairs: int
    units: int
    pairs_per_unit: int
    pairs_dropped_by_cap: int

    NOTICE: str = field(default="LOCAL DIAGNOSTICS - NOT FOR RELEASE: exact statistics of private data, no DP "
                        "noise. Never send them to the coordinator or publish them.", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"notice": self.NOTICE, **{k: v for k, v in asdict(self).items() if k != "NOTICE"}}


@dataclass(frozen=True)
class TrainingResult:
    """Outcome of `train_bradley_terry`: the public privacy report and the local diagnostics."""

    report: PrivacyReport
    diagnostics: LocalDiagnostics
