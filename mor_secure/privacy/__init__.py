"""Differential privacy for silos: accounting maths, the persisted budget ledger, DP-SGD training.

`accounting` is pure (no state); `ledger` owns the on-disk record of spends;
`dp_training` trains reward models with Opacus and charges the ledger.
"""

from __future__ import annotations

from mor_secure.privacy.accounting import Accountant, epsilon_spent, noise_multiplier_for
from mor_secure.privacy.dp_training import (
    DPConfig,
    PrivacyReport,
    TrainingConfig,
    TrainingResult,
    bradley_terry_loss,
    train_bradley_terry,
)
from mor_secure.privacy.ledger import BudgetExceededError, PrivacyLedger, PrivacySpend
from mor_secure.privacy.randomized_response import debiased_mean, flip_probability, randomize_bits

__all__ = [
    "Accountant",
    "BudgetExceededError",
    "DPConfig",
    "PrivacyLedger",
    "PrivacyReport",
    "PrivacySpend",
    "TrainingConfig",
    "TrainingResult",
    "bradley_terry_loss",
    "debiased_mean",
    "epsilon_spent",
    "flip_probability",
    "noise_multiplier_for",
    "randomize_bits",
    "train_bradley_terry",
]
