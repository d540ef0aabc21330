"""Bradley-Terry reward-model training, with DP-SGD (Opacus) by default.

Data contract: a map-style `Dataset` whose item i is a tuple of tensors
``(*chosen_inputs, *rejected_inputs)`` — the inputs of the chosen side, then
the same inputs for the rejected side, in the same order. `model(*side_inputs)`
returns a 1-D tensor of scores, one per row.

The privacy unit (`DPConfig.privacy_unit`) is one image / one patient by
default: `unit_ids` names each pair's unit, all pairs of a unit are one DP
sample with one clipped gradient (`privacy_units`), and the accountant's
sample rate is over units. `privacy_unit: pair` makes each pair its own unit,
and warns on every run that the guarantee is then per pair, not per unit.

Randomness: `TrainingConfig.seed` sets weight initialisation and data order
only. Poisson sampling and the Gaussian noise come from generators seeded from
OS entropy on every run (or Opacus' CSPRNG in `secure_mode`), so nobody who
knows the config can regenerate the noise (DESIGN §4).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mor_secure.privacy.accounting import noise_multiplier_for, poisson_schedule
from mor_secure.privacy.ledger import PrivacyLedger, Reservation
from mor_secure.privacy.opacus_engine import (
    check_dp_compatible,
    detach_opacus,
    epsilon_so_far,
    prepare_private_training,
)
from mor_secure.privacy.privacy_units import (
    UnitGrouping,
    flatten_units,
    group_pairs_by_unit,
    scores_unit_batches,
    sum_grad_samples_per_unit,
    unit_dataset,
    unit_weights,
)
from mor_secure.privacy.reports import LocalDiagnostics, PrivacyReport, TrainingResult
from mor_secure.privacy.training_config import (
    NOISE_SEEDED,
    PER_PAIR_UNITS,
    TrainingConfig,
    UnitKind,
    guarantee_unit_of,
    run_declaration,
)
from mor_secure.privacy.unprotected_state import FrozenStateSnapshot
from mor_secure.weakened_privacy import warn_weakened_privacy

logger = logging.getLogger(__name__)


def bradley_terry_loss(model: nn.Module, chosen: Sequence[Tensor], rejected: Sequence[Tensor],
                       *, weights: Tensor | None = None) -> Tensor:
    """-log sigmoid(score(chosen) - score(rejected)): the mean over pairs, or the `weights`-weighted sum.

    Two forward passes, never one over the concatenated sides: Opacus's hooks
    stack the activations of both passes and add their per-sample gradients
    row by row, so row i's gradient is pair i's whole gradient and is clipped
    once. A concatenated batch of 2n rows would clip each side separately,
    doubling a pair's sensitivity and voiding the accountant's guarantee.
    """
    chosen_scores = model(*chosen)
    rejected_scores = model(*rejected)
    expected = (chosen[0].shape[0],) if weights is None else tuple(weights.shape)
    for scores in (chosen_scores, rejected_scores):
        if tuple(scores.shape) != expected:
            raise ValueError(
                f"model must return a tensor of {expected} scores (one per row), got shape {tuple(scores.shape)}"
            )
    losses = -F.logsigmoid(chosen_scores - rejected_scores)
    return losses.mean() if weights is None else (losses * weights).sum()


def train_bradley_terry(
    model: nn.Module,
    dataset: Dataset,
    config: TrainingConfig,
    *,
    unit_ids: Sequence[Hashable] | None = None,
    units_are: UnitKind = "image",
    ledger: PrivacyLedger | None = None,
    reservation: Reservation | None = None,
    purpose: str = "train:reward-model",
    progress: bool = True,
    description: str = "training",
) -> TrainingResult:
    """Train `model` in place on preference pairs and return what it cost.

    `unit_ids` (one per pair) names each pair's privacy unit; it is required
    with `privacy_unit: image` and ignored, with a warning, under `pair`; `units_are` says what those
    units are (images, or patients: a silo's own data), which the report and the ledger charge name as the
    guarantee's unit. With DP (the default)
    and a `ledger`, the run spends a `reservation` made before any data was
    read (or reserves `target_epsilon` itself, refused with
    `BudgetExceededError` if unaffordable) and settles it with the epsilon
    actually spent, also when training stops on an error part-way. A process
    killed mid-run leaves its reservation charged. A reservation handed in
    must be open in `ledger` as reserved, declaring `run_declaration` of this
    run (unit and noise), or the run is refused before its first step and
    the reservation left as it is. `model` comes back as the
    plain module it was, with every Opacus hook and attribute removed.
    """
    start = time.perf_counter()
    if reservation is not None and ledger is None:
        raise ValueError("a reservation needs the ledger it was made in: pass ledger= as well")
    if reservation is not None and config.dp.enabled:
        # Before the first step, and outside the release below: a reservation that is not this run's open one
        # (settled, another ledger's, declared for another unit or noise) is left as it is.
        ledger.check_open(reservation, declared=run_declaration(config.dp, units_are=units_are))
    try:
        n_inputs = _inputs_per_side(dataset)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
        dp = config.dp
        if reservation is not None and dp.enabled and (reservation.epsilon < dp.target_epsilon
                                                       or reservation.delta < dp.target_delta):
            # The run spends its target whatever it was handed; settling above the reservation is refused
            # only after every noisy step has run, so check before the first.
            raise ValueError(f"the reservation (epsilon={reservation.epsilon:g}, delta={reservation.delta:g}) does "
                             f"not cover this run's target (epsilon={dp.target_epsilon:g}, "
                             f"delta={dp.target_delta:g}); reserve the target, or lower it to the reservation")
        per_unit = dp.enabled and dp.privacy_unit == "image"
        if per_unit:
            if unit_ids is None or len(unit_ids) != len(dataset):
                raise ValueError(
                    f"privacy_unit 'image' needs unit_ids, one per pair ({len(dataset)}), naming each pair's unit "
                    f"(got {'none' if unit_ids is None else len(unit_ids)}); or set dp.privacy_unit: pair")
            grouping = group_pairs_by_unit(unit_ids, max_pairs_per_unit=dp.max_pairs_per_unit, seed=config.seed)
        else:
            if dp.enabled:
                _warn_per_pair(description, unit_ids)
            grouping = group_pairs_by_unit(range(len(dataset)), max_pairs_per_unit=None, seed=config.seed)
        _check_unit_count(config, grouping.units, description)
        torch.manual_seed(config.seed)
        optimizer = torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        units = unit_dataset(dataset, grouping)
    except BaseException:
        if reservation is not None:  # refused before any noisy step: nothing was released
            ledger.release(reservation, reason="training refused its inputs before DP-SGD started")
        raise
    was_training = model.training
    model.train()
    try:
        if dp.enabled:
            report, losses = _train_private(
                model, units, grouping, config, optimizer, n_inputs=n_inputs, units_are=units_are, ledger=ledger,
                reservation=reservation, purpose=purpose, progress=progress, description=description,
            )
        else:
            report, losses = _train_plain(
                model, units, config, optimizer, n_inputs=n_inputs, ledger=ledger,
                progress=progress, description=description,
            )
    finally:
        model.train(was_training)
    diagnostics = LocalDiagnostics(loss_history=losses, seconds=time.perf_counter() - start, pairs=len(dataset),
                                   units=grouping.units, pairs_per_unit=grouping.pairs_per_unit,
                                   pairs_dropped_by_cap=grouping.dropped_pairs)
    return TrainingResult(report=report, diagnostics=diagnostics)


def _train_private(
    model: nn.Module,
    units: Dataset,
    grouping: UnitGrouping,
    config: TrainingConfig,
    optimizer: torch.optim.Optimizer,
    *,
    n_inputs: int,
    units_are: UnitKind,
    ledger: PrivacyLedger | None,
    reservation: Reservation | None,
    purpose: str,
    progress: bool,
    description: str,
) -> tuple[PrivacyReport, list[float]]:
    dp = config.dp
    n_units = grouping.units
    if ledger is not None and reservation is None:
        reservation = ledger.reserve(purpose=purpose, epsilon=dp.target_epsilon, delta=dp.target_delta,
                                     details=run_declaration(dp, units_are=units_are))
    try:
        check_dp_compatible(model)
        # The noise is planned at the rate Opacus' accountant charges, for exactly the
        # steps that run, so the epsilon it reports stays within the target.
        # Planned from the public count when there is one: the schedule is published, and n_units is private.
        schedule = poisson_schedule(n_units=dp.planned_units(n_units), batch_size=config.batch_size)
        noise_multiplier = noise_multiplier_for(
            target_epsilon=dp.target_epsilon,
            target_delta=dp.target_delta,
            sample_rate=schedule.accounted_rate,
            steps=config.epochs * schedule.steps_per_epoch,
            accountant=dp.accountant,
        )
        frozen_before = FrozenStateSnapshot(model)  # before Opacus attaches: nothing to detach if it fails
        private = prepare_private_training(model, units, optimizer, dp, sample_rate=schedule.sampler_rate,
                                           noise_multiplier=noise_multiplier)
    except BaseException:
        if reservation is not None:  # refused before the first noisy step: nothing was released
            ledger.release(reservation, reason="DP-SGD could not start")
        raise
    failure: BaseException | None = None
    try:
        # The batch sampler's: in secure mode Opacus hands back a plain DataLoader around it, with its CSPRNG.
        sampled_at = private.loader.batch_sampler.sample_rate
        if (sampled_at, len(private.loader)) != (schedule.sampler_rate, schedule.steps_per_epoch):
            raise RuntimeError(
                f"Opacus sampled at rate {sampled_at} for {len(private.loader)} steps per epoch, "
                f"but the noise was planned for {schedule.sampler_rate} and {schedule.steps_per_epoch}; "
                "check the installed Opacus version"
            )
        losses = _run_epochs(
            private.module,
            private.optimizer,
            private.loader,
            n_inputs=n_inputs,
            epochs=config.epochs,
            per_unit_gradients=True,
            progress=progress,
            description=description,
            epsilon_so_far=lambda: epsilon_so_far(private.engine, dp.target_delta),
        )
    except BaseException as error:
        failure = error
        raise
    finally:
        detach_opacus(private.module, private.optimizer, model)
        # The accountant counts every noisy step taken, including those of a run
        # that failed part-way: they are spent whether or not training finished.
        steps = sum(n for _, _, n in private.engine.accountant.history)
        report = PrivacyReport(
            dp_enabled=True,
            epsilon=epsilon_so_far(private.engine, dp.target_delta) if steps else 0.0,
            delta=dp.target_delta if steps else 0.0,
            noise_multiplier=noise_multiplier,
            sample_rate=schedule.accounted_rate,  # what the accountant charged: epsilon_spent reproduces `epsilon`
            steps=steps,
            epochs=config.epochs,
            max_grad_norm=dp.max_grad_norm,
            accountant=dp.accountant,
            privacy_unit=guarantee_unit_of(dp, units_are=units_are),
            max_pairs_per_unit=dp.max_pairs_per_unit if dp.privacy_unit == "image" else None,
            noise=private.noise,
            private=private.noise != NOISE_SEEDED,
            mechanisms=(f"DP-SGD (Poisson-subsampled Gaussian, {dp.accountant} accountant) over "
                        f"{'units of pairs' if dp.privacy_unit == 'image' else 'pairs'}",
                        "scores served: post-processing of the DP model (no further cost)"),
        )
        if ledger is not None and reservation is not None:
            ledger.settle(reservation, epsilon=report.epsilon, delta=report.delta, details=report.to_dict())
        # After the settle, which nothing may skip; and on a run that fails part-way too.
        changed = frozen_before.restore_changed()
        if changed and failure is not None:  # the run's own error goes on, saying this too
            logger.error("%s", _state_changed_message(changed))
            failure.add_note(_state_changed_message(changed))
    if changed:
        raise RuntimeError(_state_changed_message(changed))
    return report, losses


def _state_changed_message(changed: list[str]) -> str:
    return (f"the model's state {', '.join(changed)} changed during DP-SGD: it was computed from private data "
            "outside the clipped, noised gradients, so the model is not private. The run's spending is recorded; "
            "buffers were put back, a frozen parameter cannot be (discard the model). Keep such state out of "
            "training (eval mode, no buffer, no writes into frozen weights)")


def _check_unit_count(config: TrainingConfig, units: int, description: str) -> None:
    """Refuse a run the number of privacy units makes unsound; under a public unit count, only say so locally.

    With `dp.public_unit_count` the published schedule says nothing of the
    actual count, and neither may the release: refusing on the actual count
    would release a model for one dataset and none for its neighbour with a
    unit more or less at the boundary, which epsilon does not cover. So then
    the same conditions hold against the public count (the config refuses
    them: `TrainingConfig`, `DPConfig`), and against the actual count they are
    only told to the operator here, who knows the data; the run goes on.
    """
    dp = config.dp
    if units == 0:
        raise ValueError("no privacy units to train on; add data")
    problems = []
    if config.batch_size >= units:
        problems.append((f"batch_size ({config.batch_size}) must be smaller than the number of privacy units "
                         f"({units})", "lower batch_size or add data"))
    if dp.enabled and dp.target_delta >= 1 / units:
        # Dwork & Roth 2014, section 2.3: publishing each record with probability delta is
        # (0, delta)-DP, so delta >= 1/n lets about one whole unit out in the clear.
        problems.append((f"target_delta ({dp.target_delta:g}) must be below 1/n = {1 / units:.3g} for the {units} "
                         "privacy units (with delta >= 1/n the guarantee allows publishing a whole unit in the clear)",
                         "lower target_delta (1/n^1.1 or less is usual) or add data"))
    public = dp.public_unit_count
    if dp.enabled and public is not None:
        rate = poisson_schedule(n_units=public, batch_size=config.batch_size).sampler_rate
        if units * rate < 1:
            problems.append((f"dp.public_unit_count ({public}) is so far above the data's {units} units that the "
                             f"expected batch holds {units * rate:.2g} of them", "declare a count nearer the data's"))
        for problem, fix in problems:
            warn_weakened_privacy(f"training {description!r}: {problem}. It trains and is released all the same, "
                                  "since under a public unit count whether a model comes out must not depend on the "
                                  f"actual count; {fix} for the next run")
    elif problems:
        problem, fix = problems[0]
        raise ValueError(f"{problem}; {fix}")


def _warn_per_pair(description: str, unit_ids: Sequence[Hashable] | None) -> None:
    """`privacy_unit: pair` weakens the default per-unit guarantee: say so on every run, as for DP off."""
    units = "" if unit_ids is None else f"the {len(set(unit_ids))} units unit_ids names are ignored, and "
    warn_weakened_privacy(f"training {description!r} with privacy_unit 'pair': its epsilon is per preference pair, "
                          f"NOT per unit: {units}{PER_PAIR_UNITS}")


def _train_plain(
    model: nn.Module,
    units: Dataset,
    config: TrainingConfig,
    optimizer: torch.optim.Optimizer,
    *,
    n_inputs: int,
    ledger: PrivacyLedger | None,
    progress: bool,
    description: str,
) -> tuple[PrivacyReport, list[float]]:
    warn_weakened_privacy(
        f"training {description!r} WITHOUT differential privacy"
        + (f"; nothing is charged to the privacy ledger {ledger.path}" if ledger is not None else "")
    )
    loader = DataLoader(units, batch_size=config.batch_size, shuffle=True)
    losses = _run_epochs(
        model,
        optimizer,
        loader,
        n_inputs=n_inputs,
        epochs=config.epochs,
        per_unit_gradients=False,
        progress=progress,
        description=description,
        epsilon_so_far=None,
    )
    report = PrivacyReport(
        dp_enabled=False,
        epsilon=math.inf,
        delta=1.0,
        noise_multiplier=0.0,
        sample_rate=config.batch_size / len(units),
        steps=config.epochs * len(loader),
        epochs=config.epochs,
        max_grad_norm=None,
        accountant=None,
        privacy_unit=None,
        max_pairs_per_unit=None,
        noise=None,
        private=False,
        mechanisms=(),
    )
    return report, losses


def _run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    n_inputs: int,
    epochs: int,
    per_unit_gradients: bool,
    progress: bool,
    description: str,
    epsilon_so_far: Callable[[], float] | None,
) -> list[float]:
    """Run the epochs; return the mean loss per unit per epoch (NaN for an epoch whose batches were all empty).

    A batch is ``(*chosen [b, K, ...], *rejected [b, K, ...], mask [b, K])``.
    """
    device = next(p for p in model.parameters() if p.requires_grad).device
    # Models that score unit batches directly get one gradient per unit from Opacus itself.
    flat = not (per_unit_gradients and scores_unit_batches(model))
    history: list[float] = []
    postfix: dict[str, str] = {}
    with tqdm(total=epochs * len(loader), desc=description, unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            loss_sum, units_seen = 0.0, 0
            for batch in loader:
                *inputs, mask = [t.to(device) for t in batch]
                units, pairs_per_unit = mask.shape
                rows = flatten_units(inputs) if flat else inputs
                optimizer.zero_grad(set_to_none=True)
                loss = bradley_terry_loss(model, rows[:n_inputs], rows[n_inputs:],
                                          weights=unit_weights(mask, flat=flat))
                # A Poisson batch can be empty (zero-row tensors). It still goes
                # through forward, backward and step: the DP optimizer adds noise
                # to a zero gradient and the accountant counts the step; skipping
                # it would reveal that the batch was empty. It stays out of the history.
                with warnings.catch_warnings():
                    # Opacus' hooks fire on layers fed by frozen features (inputs need no grad);
                    # torch warns about that once per run, which is expected here, not a fault.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                if per_unit_gradients and flat:
                    sum_grad_samples_per_unit(model, units=units, pairs_per_unit=pairs_per_unit)
                optimizer.step()
                if units:
                    # The weights sum to 1 / K (flat) or 1: the mean over units of their mean pair loss.
                    unit_mean = loss.item() * (pairs_per_unit if flat else 1)
                    loss_sum += unit_mean * units
                    units_seen += units
                    postfix["loss"] = f"{unit_mean:.4f}"
                bar.update(1)
                bar.set_postfix(postfix, refresh=False)
            history.append(loss_sum / units_seen if units_seen else math.nan)
            if progress and epsilon_so_far is not None:
                # Once per epoch: a PRV epsilon takes a fraction of a second.
                postfix["epsilon"] = f"{epsilon_so_far():.3f}"
                bar.set_postfix(postfix)
    return history


def _inputs_per_side(dataset: Dataset) -> int:
    """Check the data contract on the first item; return the number of input tensors per side."""
    if len(dataset) == 0:
        raise ValueError("dataset is empty: there are no preference pairs to train on")
    item = dataset[0]
    if not isinstance(item, (tuple, list)) or not item or not all(isinstance(t, Tensor) for t in item):
        raise ValueError(
            "each dataset item must be a tuple of tensors (*chosen_inputs, *rejected_inputs), "
            f"got {type(item).__name__}"
        )
    if len(item) % 2:
        raise ValueError(
            f"each dataset item must hold the same number of tensors for the chosen and the rejected side, "
            f"got {len(item)} tensors"
        )
    return len(item) // 2
