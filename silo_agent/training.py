"""The silo's DP training job: private pairs -> DP reward model, standardised, saved, charged, reported.

Order matters for the guarantee: the ledger reserves the run's target epsilon
before any private data is read (so two jobs cannot both spend the last of a
budget, and a killed job stays charged), and only DP outputs are written to
the public report.
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mor_secure.config import load_config, resolve_relative
from mor_secure.data import (
    ConsortiumSpec,
    ConsortiumSplits,
    PreferencePair,
    import_preference_jsonl,
    load_consortium,
    make_pairs,
    make_splits,
    pairs_for_silo,
)
from mor_secure.data.preferences import silo_seed
from mor_secure.data.records import privacy_unit_of
from mor_secure.models.digests import directory_digest
from mor_secure.models.reward_architectures import (
    FrozenEncoderRewardModel,
    LoraVLMRewardModel,
    SmallCNNRewardModel,
)
from mor_secure.models.reward_model import RewardModel
from mor_secure.pki.files import PRIVATE_FILE_MODE, make_private_directory, replace_file
from mor_secure.privacy import PrivacyLedger, PrivacyReport, train_bradley_terry
from mor_secure.privacy.ledger_chain import NEW_LEDGER_IS_NOT_A_RESET, LedgerMissingError
from mor_secure.privacy.privacy_units import held_out_units
from mor_secure.privacy.training_config import UnitKind, run_declaration

from .config import SiloConfig

logger = logging.getLogger(__name__)

MODEL_DIR = "reward_model"
LEDGER_FILE = "privacy_ledger.json"
REPORT_FILE = "privacy_report.json"
DIAGNOSTICS_FILE = "local_diagnostics.json"
# Held (flock) for the whole of `train_silo`: one training per workdir at a time.
TRAINING_LOCK_FILE = ".training.lock"
# Where the served scores' standardisation comes from: public data, so it releases nothing (DESIGN §4).
STANDARDISATION_SOURCE = ("both answers of the consortium's public calibration pairs, scored by the DP model "
                          "(post-processing: no privacy cost)")
# 200 pairs per kind = 1,200 scores: the mean and std to ~0.06 std (1.96 / sqrt(1200)), in seconds even for lora_vlm.
STANDARDISATION_PAIRS_PER_KIND = 200


@dataclass(frozen=True)
class SiloTrainingOutcome:
    """What a training job produced."""

    model: RewardModel
    report: PrivacyReport
    model_dir: Path
    report_path: Path
    diagnostics_path: Path


def load_silo_config(path: str | Path) -> SiloConfig:
    """Load a silo YAML and resolve its relative paths against the file's directory."""
    config = load_config(path, SiloConfig)
    updates = {"consortium": resolve_relative(path, config.consortium), "workdir": resolve_relative(path, config.workdir)}
    for optional in ("base_model", "feature_cache"):
        if getattr(config, optional) is not None:
            updates[optional] = resolve_relative(path, getattr(config, optional))
    if config.data is not None:
        updates["data"] = config.data.model_copy(update={
            field: resolve_relative(path, getattr(config.data, field)) for field in ("pairs", "images")})
    if config.serve is not None:
        serve = config.serve
        updates["serve"] = serve.model_copy(update={
            field: resolve_relative(path, getattr(serve, field))
            for field in ("kit", "crl", "policy", "audit_log") if getattr(serve, field) is not None})
    return config.model_copy(update=updates)


def build_reward_model(config: SiloConfig) -> RewardModel:
    """A fresh, untrained model of the configured architecture."""
    if config.architecture == "lora_vlm":
        return LoraVLMRewardModel(base_model=config.base_model, seed=config.training.seed)
    if config.architecture == "frozen_encoders":
        return FrozenEncoderRewardModel(cache_dir=feature_cache_dir(config), seed=config.training.seed)
    return SmallCNNRewardModel(seed=config.training.seed)


def feature_cache_dir(config: SiloConfig) -> Path:
    """Where training caches the frozen features of the silo's own images; ValueError if it is the served cache."""
    training, served = config.feature_cache or config.workdir / "feature_cache", _served_cache(config)
    if training.resolve().is_relative_to(served.resolve()) or served.resolve().is_relative_to(training.resolve()):
        raise ValueError(f"feature_cache {training} is, holds or lies within {served}, the served model's cache: "
                         "serving would answer the silo's own images from it, and its latency would tell callers "
                         "which images are private; set feature_cache elsewhere (or leave it out)")
    return training


def served_feature_cache_dir(config: SiloConfig) -> Path:
    """The served model's own feature cache, never the training one (`feature_cache_dir` refuses that).

    The training cache holds the features of every private image, so a
    served model reading it would answer a private image from the cache
    (about 1 ms) and any other after an encoder pass (about 60 ms): the call's
    latency would tell the caller which images are in the silo's data, a
    leak outside the DP guarantee. This cache only ever holds what callers sent.
    """
    feature_cache_dir(config)
    return _served_cache(config)


def _served_cache(config: SiloConfig) -> Path:
    return config.workdir / "served_feature_cache"


def ledger_path(config: SiloConfig) -> Path:
    return config.workdir / LEDGER_FILE


def create_ledger(config: SiloConfig, *, force: bool = False) -> PrivacyLedger:
    """`mor silo init`: the silo's ledger, created once with the configured lifetime budget.

    Only for a silo the consortium file names (UnknownNameError otherwise): a
    ledger made under a mistyped name would be charged for nothing it trains.
    A ledger belongs to its workdir, and only this silo's commands write
    there: a workdir that holds anything but no ledger (the ledger's lock
    file, a report, a model, an audit log; the training lock aside) lost its ledger, so it is refused
    with `LedgerMissingError` unless `force` (new data only), which logs a warning.
    """
    load_consortium(config.consortium).silo(config.name)
    # A forced ledger under a running training would take the place of the one holding its reservation.
    with training_lock(config.workdir, refused="a new ledger would lose the spend it has reserved. Nothing "
                        "was changed"):
        return _create_ledger(config, force=force)


def _create_ledger(config: SiloConfig, *, force: bool) -> PrivacyLedger:
    path = ledger_path(config)
    # The training lock alone is no sign of a lost ledger: a refused or DP-off `mor silo train` leaves it.
    used = sorted(p.name for p in config.workdir.iterdir() if p.name != TRAINING_LOCK_FILE) \
        if config.workdir.is_dir() else []
    if used and not path.exists():
        if not force:
            raise LedgerMissingError(
                f"{config.workdir}: this workdir was used before (it holds {', '.join(used)}) but has no privacy "
                f"ledger, and a new one would give the silo its whole budget again for data it trained on. Restore "
                f"{LEDGER_FILE} from backup into it. {NEW_LEDGER_IS_NOT_A_RESET} A new silo gets a new, empty "
                "workdir; for new data only, add --force-new-ledger.")
        logger.warning(
            "privacy ledger %s: FORCED NEW LEDGER for silo %r in a workdir that was used before (it holds %s) and "
            "lost its ledger: the record of past spends is gone. Training again on the same data under the new "
            "budget VOIDS the differential-privacy guarantee: this is only correct for new data.",
            path, config.name, ", ".join(used))
    return PrivacyLedger.create(path, silo=config.name, epsilon_budget=config.privacy_budget.epsilon,
                                delta_budget=config.privacy_budget.delta, force=force)


def open_ledger(config: SiloConfig) -> PrivacyLedger:
    """The silo's existing ledger; refused (never recreated) when missing or made for another budget."""
    return PrivacyLedger(ledger_path(config), silo=config.name, epsilon_budget=config.privacy_budget.epsilon,
                         delta_budget=config.privacy_budget.delta)


def silo_pairs(config: SiloConfig, spec: ConsortiumSpec, splits: ConsortiumSplits) -> tuple[PreferencePair, ...]:
    """The silo's private pairs: its own file (`data:`, validated whole: DataImportError), else its easy-VQA
    partition with the consortium file's label noise (the benchmark)."""
    if config.data is not None:
        # Per pair, no row's unit_id counts (the config warns so), so `data.unit` has nothing to hold rows to.
        declared = None if config.training.dp.privacy_unit == "pair" else config.data.unit
        return import_preference_jsonl(config.data.pairs, config.data.images, unit=declared)
    return pairs_for_silo(splits, spec, config.name)


def units_are(config: SiloConfig) -> UnitKind:
    """What the silo's privacy units are: its own data's `data.unit` (patients by unit_id, or images), else
    images (its easy-VQA partition)."""
    return config.data.unit if config.data is not None else "image"


def split_silo_pairs(config: SiloConfig, spec: ConsortiumSpec,
                     splits: ConsortiumSplits) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) pairs of the silo, split by privacy unit: about `validation_fraction` of the units,
    each chosen on its own id (`held_out_units`), held back for the local held-out accuracy (none, at times,
    of a few units)."""
    pairs = list(silo_pairs(config, spec, splits))
    held_out = held_out_units((privacy_unit_of(p) for p in pairs), fraction=config.validation_fraction,
                              salt=f"{silo_seed(spec.seed, config.name)}/held-out")
    return ([p for p in pairs if privacy_unit_of(p) not in held_out],
            [p for p in pairs if privacy_unit_of(p) in held_out])


def public_standardisation_pairs(spec: ConsortiumSpec, splits: ConsortiumSplits) -> tuple[PreferencePair, ...]:
    """Clean pairs on the consortium's public calibration images: what the served scores are standardised on."""
    return make_pairs(splits.calibration, seed=spec.seed, max_pairs_per_kind=STANDARDISATION_PAIRS_PER_KIND)


class WorkdirBusyError(ValueError):
    """Another training holds the silo's workdir."""


@contextmanager
def training_lock(workdir: Path, *, refused: str) -> Iterator[None]:
    """The workdir for one training at a time: two would interleave their saves, so the public report beside
    the model could be the other run's. Taken before anything is reserved or written, so a refused run (or
    `mor silo init`, which takes it too) changes nothing; `mor silo serve` takes it while it loads the model
    and its report, so it never pairs one run's model with another's report. `refused` says why, in the
    refusal."""
    _make_workdir(workdir)
    with open(workdir / TRAINING_LOCK_FILE, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusyError(
                f"{workdir}: another `mor silo train` or `mor silo init` is running on this workdir, or a "
                f"`mor silo serve` is starting on it; wait for it to finish: {refused}") from None
        yield  # the lock goes with the file's closing, however the job ends


def _make_workdir(workdir: Path) -> None:
    """Create `workdir` mode 0700 if missing (its parents as the umask has them); an existing one is left as it is.

    It holds the silo's exact private statistics and its audit log, so no other user may list or read it.
    """
    if not workdir.is_dir():
        make_private_directory(workdir)


def train_silo(config: SiloConfig, *, progress: bool = True) -> SiloTrainingOutcome:
    """Run the whole job, alone on its workdir. With DP, the target spend is reserved before any private data
    is read."""
    # The ledger first: an uninitialised workdir is refused before the lock (or anything else) is written there.
    ledger = open_ledger(config) if config.training.dp.enabled else None
    with training_lock(config.workdir, refused="two at once would mix their model and public report. Nothing "
                        "was reserved or read"):
        return _train_silo(config, ledger, progress=progress)


def _train_silo(config: SiloConfig, ledger: PrivacyLedger | None, *, progress: bool) -> SiloTrainingOutcome:
    dp = config.training.dp
    purpose = f"train:reward-model:{config.architecture}"
    reservation = None
    if ledger is not None:
        reservation = ledger.reserve(purpose=purpose, epsilon=dp.target_epsilon, delta=dp.target_delta,
                                     details=run_declaration(dp, units_are=units_are(config)))
    try:
        spec: ConsortiumSpec = load_consortium(config.consortium)
        splits = make_splits(spec)
        train, held_out = split_silo_pairs(config, spec, splits)
        logger.info("silo %s: %d training pairs, %d held-out pairs, from %s", config.name, len(train), len(held_out),
                    config.data.pairs if config.data is not None else "its easy-VQA partition")
        if not held_out:
            logger.warning("silo %s: none of its privacy units fell in the held-out share (validation_fraction "
                           "%s), so local_diagnostics.json has no held-out accuracy; with this few units, a larger "
                           "validation_fraction holds some back", config.name, config.validation_fraction)
        model = build_reward_model(config)
        if isinstance(model, SmallCNNRewardModel):
            # Public data only (the coordinator's published SFT split): no privacy cost.
            model.pretrain(splits.sft, steps=config.public_pretraining_steps, seed=config.training.seed,
                           progress=progress)
        dataset = model.pair_dataset(train)
    except BaseException:
        # Nothing was released before DP-SGD started; a run killed outright never gets here and stays charged.
        if reservation is not None:
            ledger.release(reservation, reason="the job failed before DP-SGD started")
        raise
    # From here on `train_bradley_terry` settles the reservation, whatever happens.
    result = train_bradley_terry(model.module, dataset, config.training,
                                 unit_ids=[privacy_unit_of(p) for p in train], units_are=units_are(config),
                                 ledger=ledger, reservation=reservation, purpose=purpose, progress=progress,
                                 description=f"{config.name} {config.architecture}")
    standardisation = model.fit_standardisation(public_standardisation_pairs(spec, splits))
    report_path = config.workdir / REPORT_FILE
    # The previous run's report goes before its model is overwritten, and the new one names the weights it
    # describes: a job stopped in between leaves no report, never one of another run (serving refuses both).
    report_path.unlink(missing_ok=True)
    model_dir = model.save(config.workdir / MODEL_DIR)
    report_path.write_text(json.dumps({
        "silo": config.name,
        "architecture": config.architecture,
        "model_digest": directory_digest(model_dir),
        "trainable_params": model.trainable_parameters(),
        "privacy": result.report.to_dict(),
        "standardisation": {"mean": standardisation.mean, "std": standardisation.std,
                            "fitted_on": STANDARDISATION_SOURCE},
        "ledger": None if ledger is None else {
            "spent_epsilon": ledger.spent_epsilon, "spent_delta": ledger.spent_delta,
            "budget_epsilon": ledger.epsilon_budget, "budget_delta": ledger.delta_budget},
    }, indent=2), encoding="utf-8")
    diagnostics_path = config.workdir / DIAGNOSTICS_FILE
    # Exact statistics of the private data, without noise: NOT FOR RELEASE, so for the silo's own account only.
    replace_file(diagnostics_path, json.dumps({
        **result.diagnostics.to_dict(),
        "train_pairs": len(train),
        "held_out_pairs": len(held_out),
        "held_out_pairwise_accuracy": model.pairwise_accuracy(held_out) if held_out else None,
    }, indent=2).encode("utf-8"), mode=PRIVATE_FILE_MODE)
    return SiloTrainingOutcome(model, result.report, model_dir, report_path, diagnostics_path)
