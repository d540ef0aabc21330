"""Simulation-only reward-model baselines of the MoR evaluation (DESIGN §2.4): FedAvg and centralised.

Both read every silo's private pairs in one process, which the deployed system
never does: that is why they live in `mor_cli` (the one package allowed to use
both roles) and never in `silo_agent` or `coordinator`.

- FedAvg (McMahan et al. 2017) of reward models: one shared architecture; each
  round every silo starts from the global trainable weights, runs DP-SGD on its
  own training pairs, and the global weights become the pair-weighted mean.
  Each silo's noise is calibrated for ALL its rounds at once, so its local
  updates' total spend meets its own `training.dp` targets. That epsilon does
  not cover the averaged model: its weights are the silos' exact pair counts,
  which no noise hides (one image fewer moves the average by a known amount),
  and the report's pair counts and loss histories are exact too; a deployment
  would need DP counts or count-free weights. Nothing is charged to the
  silos' real ledgers (this is a simulation on the benchmark's data); the
  spend is in the report instead, with what it covers.
- Centralised: every silo's noisy training pairs pooled into one dataset and
  one model; DP off by default. A reference point that breaks privacy, not a bound: it never sees the
  labelled public calibration pairs MoR's router is fitted on.

Train/validation split per silo is exactly `silo_agent.training.train_silo`'s,
so no baseline trains on a pair a silo held back. A silo YAML naming its own
data (`data:`) is refused: the baselines only ever read the benchmark
partitions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import Field, model_validator
from torch import Tensor

from mor_secure.config import StrictModel
from mor_secure.data import ConsortiumSpec, ConsortiumSplits, load_consortium, make_splits
from mor_secure.data.records import PreferencePair, privacy_unit_of
from mor_secure.models.reward_architectures import (
    FrozenEncoderRewardModel,
    LoraVLMRewardModel,
    SmallCNNRewardModel,
)
from mor_secure.models.reward_model import RewardModel
from mor_secure.privacy import DPConfig, PrivacyReport, TrainingConfig, train_bradley_terry
from mor_secure.privacy.accounting import epsilon_spent
from silo_agent.config import Architecture, SiloConfig
from silo_agent.training import (
    STANDARDISATION_SOURCE,
    feature_cache_dir,
    load_silo_config,
    public_standardisation_pairs,
    split_silo_pairs,
)

from .fedavg import frozen_state, plan_fedavg_noise, trainable_state, weighted_average

REPORT_FILE = "baseline_report.json"
# What a baseline report's epsilon does not cover; the benchmark's data is public, a deployment's would not be.
EXACT_STATISTICS = "this report's pair counts and loss histories are exact, not DP"
FEDAVG_EPSILON_COVERS = ("the silo's DP-SGD local updates only, not the averaged model, whose weights are the silos' "
                         f"exact pair counts; {EXACT_STATISTICS}")


class FedAvgSettings(StrictModel):
    """FedAvg baseline. DP targets are not here: each silo's own `training.dp` is used, for all rounds together."""

    architecture: Architecture = Field(
        "small_cnn", description="The one architecture every silo trains: small_cnn or frozen_encoders.")
    rounds: int = Field(5, gt=0, description="Federated rounds: local training, then pair-weighted averaging.")
    local_epochs: int = Field(
        4, gt=0, description="Epochs (in expectation, Poisson sampling) each silo trains per round.")
    batch_size: int = Field(
        256, gt=0, description="Expected DP-SGD batch size of every silo; must be below each silo's training pairs.")
    learning_rate: float = Field(5e-3, gt=0, allow_inf_nan=False,
                                 description="Adam learning rate of local training (a fresh Adam every round).")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="Adam weight decay of local training.")
    public_pretraining_steps: int = Field(
        800, gt=0, description="small_cnn only: steps of public trunk pre-training on the SFT split, done once "
        "for the global model; every silo starts from that trunk.")
    feature_cache: Path | None = Field(
        None, description="frozen_encoders only: image feature cache (default: the first silo's feature cache).")
    seed: int = Field(0, description="Seed of model init, pre-training and (derived per silo and round) DP-SGD.")

    @model_validator(mode="after")
    def _check_architecture(self) -> FedAvgSettings:
        if self.architecture == "lora_vlm":
            raise ValueError(
                "the FedAvg baseline does not support lora_vlm: averaging LoRA factors separately is not the "
                "average of the silos' updates (mean(B) mean(A) != mean(B A)), and one DP step of lora_vlm costs "
                "~3 s on 2 CPU cores, multiplied here by rounds x local_epochs x silos; "
                "set architecture to small_cnn or frozen_encoders")
        return self


def _centralized_training_default() -> TrainingConfig:
    return TrainingConfig(epochs=20, batch_size=256, learning_rate=5e-3, dp=DPConfig(enabled=False))


class CentralizedSettings(StrictModel):
    """Centralised baseline: one model on every silo's pooled training pairs."""

    architecture: Architecture = Field("small_cnn", description="Architecture of the one pooled model.")
    base_model: Path | None = Field(None, description="Shared VLM checkpoint directory; required for lora_vlm.")
    feature_cache: Path | None = Field(
        None, description="frozen_encoders only: image feature cache (default: the first silo's feature cache).")
    public_pretraining_steps: int = Field(
        800, gt=0, description="small_cnn only: steps of public trunk pre-training on the SFT split.")
    training: TrainingConfig = Field(
        default_factory=_centralized_training_default,
        description="Bradley-Terry settings of the pooled run; DP is OFF by default (privacy-breaking upper "
        "bound). With DP on, the targets apply to the pooled dataset. training.seed seeds init and pre-training too.")

    @model_validator(mode="after")
    def _check_base_model(self) -> CentralizedSettings:
        if self.architecture == "lora_vlm" and self.base_model is None:
            raise ValueError("architecture lora_vlm needs base_model: the path of the shared VLM checkpoint")
        if self.architecture != "lora_vlm" and self.base_model is not None:
            raise ValueError(f"base_model is only used by lora_vlm; remove it or set architecture: lora_vlm "
                             f"(architecture is {self.architecture})")
        return self


@dataclass(frozen=True)
class FedAvgOutcome:
    """What the FedAvg baseline produced. `last_round_local_states` are the silos' trainable weights
    after local training in the last round, before averaging (what the global weights average)."""

    model: RewardModel
    model_dir: Path
    report_path: Path
    train_pairs: dict[str, int]
    validation_pairs: dict[str, int]
    epsilon: dict[str, float]
    round_losses: list[float]
    last_round_local_states: dict[str, dict[str, Tensor]]
    seconds: float


@dataclass(frozen=True)
class CentralizedOutcome:
    """What the centralised baseline produced."""

    model: RewardModel
    model_dir: Path
    report_path: Path
    train_pairs: dict[str, int]
    validation_pairs: dict[str, int]
    report: PrivacyReport
    loss_history: list[float]
    seconds: float


# --- silos and their data ---------------------------------------------------------------------------

def check_same_consortium(silo_configs: Sequence[SiloConfig]) -> Path:
    """Refuse an empty list, duplicate names or silos of different consortium files; return the file."""
    if not silo_configs:
        raise ValueError("no silo configs given: pass at least one silo YAML")
    names = [c.name for c in silo_configs]
    if len(set(names)) != len(names):
        raise ValueError(f"silo names repeat: {names}; pass each silo's YAML once")
    files = {Path(c.consortium).resolve() for c in silo_configs}
    if len(files) > 1:
        raise ValueError(f"the silos use different consortium files ({', '.join(sorted(map(str, files)))}); "
                         "every silo of a baseline must point to the same consortium YAML")
    return files.pop()


def silo_configs_from_paths(paths: Sequence[str | Path]) -> list[SiloConfig]:
    """Load silo YAMLs (relative paths resolved per file) and check they form one consortium."""
    configs = [load_silo_config(path) for path in paths]
    check_same_consortium(configs)
    return configs


def _load_silo_data(silo_configs: Sequence[SiloConfig]) -> tuple[
        ConsortiumSpec, ConsortiumSplits, dict[str, tuple[list[PreferencePair], list[PreferencePair]]]]:
    """The consortium, its splits and, per silo, its (train, held-out) pairs of the benchmark partition.

    A silo with its own data (`data:`) is refused before anything is read: a
    baseline pools every silo's pairs in this one process and charges no
    ledger, so it must never see a silo's real data.
    """
    check_same_consortium(silo_configs)
    own = sorted(c.name for c in silo_configs if c.data is not None)
    if own:
        raise ValueError(f"silo(s) {', '.join(own)} name their own data (`data:` in the silo YAML); the FedAvg and "
                         "centralised baselines are a simulation on the consortium's easy-VQA partitions that pools "
                         "every silo's pairs in one process and charges no privacy ledger, so they never read a "
                         "silo's own data. Remove `data:` from a copy of the silo YAML to run the benchmark.")
    spec = load_consortium(silo_configs[0].consortium)
    splits = make_splits(spec)
    data = {c.name: split_silo_pairs(c, spec, splits) for c in silo_configs}
    return spec, splits, data


def _build_model(architecture: str, *, seed: int, feature_cache: Path, base_model: Path | None = None) -> RewardModel:
    if architecture == "lora_vlm":
        return LoraVLMRewardModel(base_model=base_model, seed=seed)
    if architecture == "frozen_encoders":
        return FrozenEncoderRewardModel(cache_dir=feature_cache, seed=seed)
    return SmallCNNRewardModel(seed=seed)


def _round_seed(seed: int, silo: str, round_index: int) -> int:
    """A distinct seed (initialisation, data order) per silo and round; DP noise never comes from it."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{silo}/{round_index}".encode()).digest()[:8], "big") >> 1


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


# --- the baselines ----------------------------------------------------------------------------------

def train_fedavg_reward_model(silo_configs: Sequence[SiloConfig], out_dir: str | Path, settings: FedAvgSettings,
                              *, progress: bool = True) -> FedAvgOutcome:
    """Train the FedAvg baseline, save it to `out_dir` (loadable by `load_reward_model`) and its report."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    spec, splits, data = _load_silo_data(silo_configs)
    names = [c.name for c in silo_configs]
    n_train = {name: len(data[name][0]) for name in names}
    unit_ids = {name: [privacy_unit_of(p) for p in data[name][0]] for name in names}
    n_units = {c.name: len(set(unit_ids[c.name])) if c.training.dp.privacy_unit == "image" else n_train[c.name]
               for c in silo_configs}
    for config in silo_configs:  # below the units the rounds are planned for, too: before any model is built
        n = n_units[config.name]
        units = min(n, config.training.dp.planned_units(n))
        if settings.batch_size >= units:
            raise ValueError(f"batch_size {settings.batch_size} is not below silo {config.name}'s {units} training "
                             "units (its dp.public_unit_count when that is fewer); lower batch_size")
    plans = {c.name: plan_fedavg_noise(n_units=n_units[c.name], batch_size=settings.batch_size,
                                       rounds=settings.rounds, local_epochs=settings.local_epochs,
                                       dp=c.training.dp)
             for c in silo_configs if c.training.dp.enabled}

    model = _build_model(settings.architecture, seed=settings.seed,
                         feature_cache=settings.feature_cache or feature_cache_dir(silo_configs[0]))
    pretraining_accuracy = None
    if isinstance(model, SmallCNNRewardModel):
        # Public SFT images only, once: every silo starts from (and keeps) this frozen trunk.
        pretraining_accuracy = model.pretrain(splits.sft, steps=settings.public_pretraining_steps,
                                              seed=settings.seed, progress=progress)
    datasets = {name: model.pair_dataset(data[name][0]) for name in names}
    frozen_before = frozen_state(model.module)

    round_losses: list[float] = []
    silo_losses: dict[str, list[list[float]]] = {name: [] for name in names}
    reports: dict[str, list[PrivacyReport]] = {name: [] for name in names}
    local_states: dict[str, dict[str, Tensor]] = {}
    for round_index in range(settings.rounds):
        local_states = {}
        for config in silo_configs:
            name, dp = config.name, config.training.dp
            plan = plans.get(name)
            if plan is not None:
                dp = dp.model_copy(update={"target_epsilon": plan.round_epsilon})
            local = copy.deepcopy(model.module)  # starts from the global weights
            training = TrainingConfig(epochs=settings.local_epochs, batch_size=settings.batch_size,
                                      learning_rate=settings.learning_rate, weight_decay=settings.weight_decay,
                                      seed=_round_seed(settings.seed, name, round_index), dp=dp)
            result = train_bradley_terry(
                local, datasets[name], training, unit_ids=unit_ids[name], ledger=None, purpose="baseline:fedavg",
                progress=progress,
                description=f"FedAvg round {round_index + 1}/{settings.rounds} {name}")
            report = result.report
            if plan is not None and (report.noise_multiplier, report.sample_rate, report.steps) != (
                    plan.noise_multiplier, plan.sample_rate, plan.steps_per_round):
                raise RuntimeError(f"silo {name}: DP-SGD ran with noise {report.noise_multiplier}, rate "
                                   f"{report.sample_rate}, {report.steps} steps, not the plan {plan}")
            if not _states_equal(frozen_state(local), frozen_before):
                raise RuntimeError(f"silo {name}: local training changed frozen parameters or buffers")
            local_states[name] = trainable_state(local)
            reports[name].append(report)
            silo_losses[name].append(result.diagnostics.loss_history)
        averaged = weighted_average([local_states[n] for n in names], [n_train[n] for n in names])
        with torch.no_grad():
            for param_name, param in model.module.named_parameters():
                if param.requires_grad:
                    param.copy_(averaged[param_name])
        round_losses.append(sum(_finite_mean(silo_losses[n][-1]) * n_train[n] for n in names) / sum(n_train.values()))

    standardisation = model.fit_standardisation(public_standardisation_pairs(spec, splits))
    model_dir = model.save(out_dir)
    epsilon = {name: (epsilon_spent(noise_multiplier=plans[name].noise_multiplier,
                                    sample_rate=plans[name].sample_rate,
                                    steps=sum(r.steps for r in reports[name]), delta=c.training.dp.target_delta,
                                    accountant=c.training.dp.accountant)
                      if name in plans else math.inf)
               for name, c in zip(names, silo_configs, strict=True)}
    seconds = time.perf_counter() - start
    report_path = model_dir / REPORT_FILE
    _write_json(report_path, {
        "baseline": "fedavg",
        "simulation_only": True,
        "architecture": settings.architecture,
        "settings": settings.model_dump(mode="json"),
        "trainable_params": model.trainable_parameters(),
        "public_pretraining_accuracy": pretraining_accuracy,
        "rounds": settings.rounds,
        "round_losses": round_losses,
        "silos": {c.name: {
            "train_pairs": n_train[c.name],
            "validation_pairs": len(data[c.name][1]),
            "loss_history_per_round": silo_losses[c.name],
            "privacy": {
                "dp_enabled": c.training.dp.enabled,
                "epsilon": epsilon[c.name],
                "delta": c.training.dp.target_delta if c.name in plans else 1.0,
                "target_epsilon": c.training.dp.target_epsilon if c.name in plans else None,
                "charged_to_ledger": False,
                "covers": FEDAVG_EPSILON_COVERS,
                "plan": asdict(plans[c.name]) if c.name in plans else None,
                "rounds": [r.to_dict() for r in reports[c.name]],
            }} for c in silo_configs},
        "standardisation": {"mean": standardisation.mean, "std": standardisation.std,
                            "fitted_on": STANDARDISATION_SOURCE},
        "seconds": seconds,
    })
    return FedAvgOutcome(model, model_dir, report_path, n_train, {n: len(data[n][1]) for n in names}, epsilon,
                         round_losses, local_states, seconds)


def train_centralized_reward_model(silo_configs: Sequence[SiloConfig], out_dir: str | Path,
                                   settings: CentralizedSettings, *, progress: bool = True) -> CentralizedOutcome:
    """Train one model on every silo's pooled training pairs (their noisy labels as given); save it and a report."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    spec, splits, data = _load_silo_data(silo_configs)
    names = [c.name for c in silo_configs]
    train = [pair for name in names for pair in data[name][0]]
    model = _build_model(settings.architecture, seed=settings.training.seed, base_model=settings.base_model,
                         feature_cache=settings.feature_cache or feature_cache_dir(silo_configs[0]))
    pretraining_accuracy = None
    if isinstance(model, SmallCNNRewardModel):
        pretraining_accuracy = model.pretrain(splits.sft, steps=settings.public_pretraining_steps,
                                              seed=settings.training.seed, progress=progress)
    result = train_bradley_terry(model.module, model.pair_dataset(train), settings.training,
                                 unit_ids=[privacy_unit_of(p) for p in train], ledger=None,
                                 purpose="baseline:centralized", progress=progress,
                                 description=f"centralized {settings.architecture}")
    standardisation = model.fit_standardisation(public_standardisation_pairs(spec, splits))
    model_dir = model.save(out_dir)
    seconds = time.perf_counter() - start
    n_train = {name: len(data[name][0]) for name in names}
    n_validation = {name: len(data[name][1]) for name in names}
    report_path = model_dir / REPORT_FILE
    _write_json(report_path, {
        "baseline": "centralized",
        "simulation_only": True,
        "architecture": settings.architecture,
        "settings": settings.model_dump(mode="json"),
        "trainable_params": model.trainable_parameters(),
        "public_pretraining_accuracy": pretraining_accuracy,
        "train_pairs": n_train,
        "validation_pairs": n_validation,
        "privacy": {**result.report.to_dict(), "charged_to_ledger": False,
                    "covers": f"the pooled model's DP-SGD training (if dp.enabled); {EXACT_STATISTICS}"},
        "loss_history": result.diagnostics.loss_history,
        "standardisation": {"mean": standardisation.mean, "std": standardisation.std,
                            "fitted_on": STANDARDISATION_SOURCE},
        "seconds": seconds,
    })
    return CentralizedOutcome(model, model_dir, report_path, n_train, n_validation, result.report,
                              result.diagnostics.loss_history, seconds)


def _states_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _write_json(path: Path, payload: dict) -> None:
    # json would write inf/nan as Infinity/NaN (not JSON): a DP-off epsilon or an empty epoch's loss becomes null.
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(payload), indent=2), encoding="utf-8")


__all__ = [
    "REPORT_FILE", "CentralizedOutcome", "CentralizedSettings", "FedAvgOutcome", "FedAvgSettings",
    "check_same_consortium", "silo_configs_from_paths", "train_centralized_reward_model",
    "train_fedavg_reward_model",
]
