"""The silo's DP training job: private pairs -> DP reward model, standardised, saved, charged, reported."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from mor_secure.config import load_config, resolve_relative
from mor_secure.data import ConsortiumSpec, ConsortiumSplits, PreferencePair, load_consortium, make_splits, pairs_for_silo
from mor_secure.data.preferences import silo_seed
from mor_secure.models.reward_architectures import (
    FrozenEncoderRewardModel,
    LoraVLMRewardModel,
    SmallCNNRewardModel,
)
from mor_secure.models.reward_model import RewardModel
from mor_secure.privacy import PrivacyLedger, PrivacyReport, train_bradley_terry

from .config import SiloConfig

logger = logging.getLogger(__name__)

MODEL_DIR = "reward_model"
LEDGER_FILE = "privacy_ledger.json"
REPORT_FILE = "privacy_report.json"


@dataclass(frozen=True)
class SiloTrainingOutcome:
    """What a training job produced."""

    model: RewardModel
    report: PrivacyReport
    model_dir: Path
    report_path: Path
    train_pairs: int
    validation_pairs: int


def load_silo_config(path: str | Path) -> SiloConfig:
    """Load a silo YAML and resolve its relative paths against the file's directory."""
    config = load_config(path, SiloConfig)
    updates = {"consortium": resolve_relative(path, config.consortium), "workdir": resolve_relative(path, config.workdir)}
    for optional in ("base_model", "feature_cache"):
        if getattr(config, optional) is not None:
            updates[optional] = resolve_relative(path, getattr(config, optional))
    return config.model_copy(update=updates)


def build_reward_model(config: SiloConfig) -> RewardModel:
    """A fresh, untrained model of the configured architecture."""
    if config.architecture == "lora_vlm":
        return LoraVLMRewardModel(base_model=config.base_model, seed=config.training.seed)
    if config.architecture == "frozen_encoders":
        return FrozenEncoderRewardModel(cache_dir=feature_cache_dir(config))
    return SmallCNNRewardModel(seed=config.training.seed)


def feature_cache_dir(config: SiloConfig) -> Path:
    return config.feature_cache or config.workdir / "feature_cache"


def open_ledger(config: SiloConfig) -> PrivacyLedger:
    return PrivacyLedger(config.workdir / LEDGER_FILE, epsilon_budget=config.privacy_budget.epsilon,
                         delta_budget=config.privacy_budget.delta)


def split_silo_pairs(config: SiloConfig, spec: ConsortiumSpec,
                     splits: ConsortiumSplits) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, validation) pairs of the silo: a seeded shuffle, the first `validation_fraction` held back."""
    pairs = list(pairs_for_silo(splits, spec, config.name))
    random.Random(silo_seed(spec.seed, config.name) + 1).shuffle(pairs)
    n_validation = max(1, int(len(pairs) * config.validation_fraction))
    return pairs[n_validation:], pairs[:n_validation]


def train_silo(config: SiloConfig, *, progress: bool = True) -> SiloTrainingOutcome:
    """Run the whole job. An unaffordable run is refused before any data is touched."""
    config.workdir.mkdir(parents=True, exist_ok=True)
    dp = config.training.dp
    ledger = open_ledger(config) if dp.enabled else None
    if ledger is not None:
        ledger.check_affordable(epsilon=dp.target_epsilon, delta=dp.target_delta)
    spec: ConsortiumSpec = load_consortium(config.consortium)
    splits = make_splits(spec)
    train, validation = split_silo_pairs(config, spec, splits)
    logger.info("silo %s: %d training pairs, %d validation pairs", config.name, len(train), len(validation))

    model = build_reward_model(config)
    if isinstance(model, SmallCNNRewardModel):
        # Public data only (the coordinator's published SFT split): no privacy cost.
        model.pretrain(splits.sft, steps=config.public_pretraining_steps, seed=config.training.seed, progress=progress)
    result = train_bradley_terry(model.module, model.pair_dataset(train), config.training, ledger=ledger,
                                 purpose=f"train:reward-model:{config.architecture}", progress=progress,
                                 description=f"{config.name} {config.architecture}")
    standardisation = model.fit_standardisation(validation)
    model_dir = model.save(config.workdir / MODEL_DIR)
    report_path = config.workdir / REPORT_FILE
    report = {
        "silo": config.name,
        "architecture": config.architecture,
        "trainable_params": model.trainable_parameters(),
        "train_pairs": len(train),
        "validation_pairs": len(validation),
        "standardisation": {"mean": standardisation.mean, "std": standardisation.std},
        "privacy": result.report.to_dict(),
        "ledger": None if ledger is None else {
            "spent_epsilon": ledger.spent_epsilon, "spent_delta": ledger.spent_delta,
            "budget_epsilon": ledger.epsilon_budget, "budget_delta": ledger.delta_budget},
        "loss_history": result.loss_history,
        "seconds": result.seconds,
    }
    report_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return SiloTrainingOutcome(model, result.report, model_dir, report_path, len(train), len(validation))
