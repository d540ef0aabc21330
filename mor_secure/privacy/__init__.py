"""Differential privacy for silos: accounting maths, privacy units, the ledger, DP-SGD training.

`accounting` and `randomized_response` are pure (no state); `privacy_units`
groups pairs into DP samples; `os_entropy` makes generators nobody can
regenerate; `ledger` owns the on-disk, hash-chained record of spends;
`dp_training` trains reward models with Opacus and settles the ledger,
`opacus_engine` attaching Opacus (with noise of its own) and taking it off,
`unprotected_state` refusing model state that changes outside the noised
gradients; `reports` separates the public privacy report from local diagnostics.
"""

from __future__ import annotations

from mor_secure.privacy.accounting import Accountant, epsilon_spent, noise_multiplier_for
from mor_secure.privacy.dp_training import bradley_terry_loss, train_bradley_terry
from mor_secure.privacy.ledger import (
    BudgetExceededError,
    LedgerError,
    LedgerMissingError,
    PrivacyCharge,
    PrivacyLedger,
    Reservation,
)
from mor_secure.privacy.opacus_engine import prepare_private_training
from mor_secure.privacy.randomized_response import debiased_mean, flip_probability, randomize_bits
from mor_secure.privacy.reports import LocalDiagnostics, PrivacyReport, TrainingResult
from mor_secure.privacy.training_config import NOISE_SEEDED, DPConfig, PrivacyUnit, TrainingConfig

__all__ = [
    "NOISE_SEEDED",
    "Accountant",
    "BudgetExceededError",
    "DPConfig",
    "LedgerError",
    "LedgerMissingError",
    "LocalDiagnostics",
    "PrivacyCharge",
    "PrivacyLedger",
    "PrivacyReport",
    "PrivacyUnit",
    "Reservation",
    "TrainingConfig",
    "TrainingResult",
    "bradley_terry_loss",
    "debiased_mean",
    "epsilon_spent",
    "flip_probability",
    "noise_multiplier_for",
    "prepare_private_training",
    "randomize_bits",
    "train_bradley_terry",
]
