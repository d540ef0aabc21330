"""Bradley-Terry reward-model training, with DP-SGD (Opacus) by default.

Data contract: a map-style `Dataset` whose item i is a tuple of tensors
``(*chosen_inputs, *rejected_inputs)`` — the inputs of the chosen side, then
the same inputs for the rejected side, in the same order. `model(*side_inputs)`
returns a 1-D tensor of scores, one per row. The privacy unit is one pair: a
neighbouring dataset adds or removes one item.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mor_secure.config import StrictModel
from mor_secure.privacy.accounting import Accountant, noise_multiplier_for
from mor_secure.privacy.ledger import PrivacyLedger, PrivacySpend

logger = logging.getLogger(__name__)


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
        description="Delta of the guarantee; keep it well below 1 / number of pairs.",
    )
    max_grad_norm: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="Per-pair gradient clipping bound C (the L2 sensitivity of one step).",
    )
    accountant: Accountant = Field(
        "prv",
        description="Privacy accountant: 'prv' (tight numerical composition) or 'rdp' (Renyi DP bound).",
    )

    @model_validator(mode="after")
    def _warn_when_off(self) -> DPConfig:
        if not self.enabled:
            _warn_dp_off(
                "DP is OFF: the reward model will be trained without differential privacy, so its "
                "weights and scores can reveal individual training pairs; never use for data that must stay private"
            )
        return self


class TrainingConfig(StrictModel):
    """Optimisation settings of one reward-model training run."""

    epochs: int = Field(20, gt=0, description="Passes over the data (in expectation, under Poisson sampling).")
    batch_size: int = Field(
        256,
        gt=0,
        description="Expected batch size. With DP each pair joins each batch independently with "
        "probability sample_rate = 1 / ceil(n_pairs / batch_size) (Poisson sampling), which is "
        "batch_size / n_pairs when batch_size divides n_pairs. Must be smaller than n_pairs.",
    )
    learning_rate: float = Field(2e-3, gt=0, allow_inf_nan=False, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="Adam weight decay.")
    seed: int = Field(0, description="Seed of torch's global RNG (sampling, noise, shuffling).")
    dp: DPConfig = Field(default_factory=DPConfig, description="Differential-privacy settings.")


@dataclass(frozen=True)
class PrivacyReport:
    """What a run spent and how: enough to recompute its epsilon with `accounting.epsilon_spent`.

    Without DP, epsilon is infinite and delta is 1: no guarantee at all.
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
    n_pairs: int
    expected_batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainingResult:
    """Outcome of `train_bradley_terry`: the privacy report, mean loss per epoch, wall time."""

    report: PrivacyReport
    loss_history: list[float]
    seconds: float


def bradley_terry_loss(model: nn.Module, chosen: Sequence[Tensor], rejected: Sequence[Tensor]) -> Tensor:
    """Mean of -log sigmoid(score(chosen) - score(rejected)) over the pairs.

    Two forward passes, never one over the concatenated sides: Opacus's hooks
    stack the activations of both passes and add their per-sample gradients
    row by row, so row i's gradient is pair i's whole gradient and is clipped
    once. A concatenated batch of 2n rows would clip each side separately,
    doubling a pair's sensitivity and voiding the accountant's guarantee.
    """
    chosen_scores = model(*chosen)
    rejected_scores = model(*rejected)
    rows = chosen[0].shape[0]
    for scores in (chosen_scores, rejected_scores):
        if scores.shape != (rows,):
            raise ValueError(
                f"model must return a 1-D tensor of {rows} scores (one per row), got shape {tuple(scores.shape)}"
            )
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def train_bradley_terry(
    model: nn.Module,
    dataset: Dataset,
    config: TrainingConfig,
    *,
    ledger: PrivacyLedger | None = None,
    purpose: str = "train:reward-model",
    progress: bool = True,
    description: str = "training",
) -> TrainingResult:
    """Train `model` in place on preference pairs and return what it cost.

    With DP (the default) the run is refused before any step if `ledger`
    cannot afford (target_epsilon, target_delta); afterwards the epsilon
    actually spent is recorded in it, also when training stops on an error
    part-way, since the steps taken are spent either way. `model` comes back
    as the plain module it was, with every Opacus hook and attribute removed.
    """
    start = time.perf_counter()
    n_inputs = _inputs_per_side(dataset)
    n_pairs = len(dataset)
    if config.batch_size >= n_pairs:
        raise ValueError(
            f"batch_size ({config.batch_size}) must be smaller than the number of pairs ({n_pairs}); "
            "lower batch_size or add data"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    was_training = model.training
    model.train()
    try:
        if config.dp.enabled:
            report, losses = _train_private(
                model, dataset, config, optimizer, n_inputs=n_inputs, ledger=ledger, purpose=purpose,
                progress=progress, description=description,
            )
        else:
            report, losses = _train_plain(
                model, dataset, config, optimizer, n_inputs=n_inputs, ledger=ledger,
                progress=progress, description=description,
            )
    finally:
        model.train(was_training)
    return TrainingResult(report=report, loss_history=losses, seconds=time.perf_counter() - start)


def _train_private(
    model: nn.Module,
    dataset: Dataset,
    config: TrainingConfig,
    optimizer: torch.optim.Optimizer,
    *,
    n_inputs: int,
    ledger: PrivacyLedger | None,
    purpose: str,
    progress: bool,
    description: str,
) -> tuple[PrivacyReport, list[float]]:
    dp = config.dp
    n_pairs = len(dataset)
    # ModuleValidator flags layers Opacus cannot privatise (BatchNorm mixes samples);
    # GradSampleModule.validate flags trainable layers holding buffers, which make_private
    # would otherwise reject only after tagging the parameters.
    errors = [*ModuleValidator.validate(model, strict=False), *GradSampleModule.validate(model, strict=False)]
    if errors:
        raise ValueError(
            "model is not compatible with DP-SGD (Opacus validators): "
            + "; ".join(str(e) for e in errors)
            + ". Replace the offending layers before training, e.g. "
            "`model = opacus.validators.ModuleValidator.fix(model)` swaps BatchNorm for GroupNorm."
        )
    if dp.target_delta >= 1 / n_pairs:
        # Dwork & Roth 2014, section 2.3: publishing each record with probability delta
        # is (0, delta)-DP, so delta >= 1/n lets about one whole pair out in the clear.
        warnings.warn(
            f"target_delta={dp.target_delta:g} is not below 1/n_pairs={1 / n_pairs:g}: "
            "the guarantee then allows revealing whole pairs; use a smaller delta",
            UserWarning,
            stacklevel=3,
        )
    if ledger is not None:
        ledger.check_affordable(epsilon=dp.target_epsilon, delta=dp.target_delta)

    # Mirror Opacus: make_private sets sample_rate = 1 / len(data_loader), and its
    # Poisson sampler draws int(1 / sample_rate) batches per epoch (float rounding
    # makes that len - 1 for some lengths, e.g. 92 for 93), so the noise is
    # planned for exactly the steps that will run.
    sample_rate = 1 / math.ceil(n_pairs / config.batch_size)
    steps_per_epoch = int(1 / sample_rate)
    noise_multiplier = noise_multiplier_for(
        target_epsilon=dp.target_epsilon,
        target_delta=dp.target_delta,
        sample_rate=sample_rate,
        steps=config.epochs * steps_per_epoch,
        accountant=dp.accountant,
    )

    engine = PrivacyEngine(accountant=dp.accountant)
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(dataset, batch_size=config.batch_size),
        noise_multiplier=noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
    )
    try:
        if dp_loader.sample_rate != sample_rate or len(dp_loader) != steps_per_epoch:
            raise RuntimeError(
                f"Opacus sampled at rate {dp_loader.sample_rate} for {len(dp_loader)} steps per epoch, "
                f"but the noise was planned for {sample_rate} and {steps_per_epoch}; "
                "check the installed Opacus version"
            )
        losses = _run_epochs(
            dp_model,
            dp_optimizer,
            dp_loader,
            n_inputs=n_inputs,
            epochs=config.epochs,
            progress=progress,
            description=description,
            epsilon_so_far=lambda: engine.accountant.get_epsilon(delta=dp.target_delta),
        )
    finally:
        _detach_opacus(dp_model, dp_optimizer, model)
        # The accountant counts every noisy step taken, including those of a run
        # that failed part-way: they are spent whether or not training finished.
        steps = sum(n for _, _, n in engine.accountant.history)
        report = PrivacyReport(
            dp_enabled=True,
            epsilon=float(engine.accountant.get_epsilon(delta=dp.target_delta)) if steps else 0.0,
            delta=dp.target_delta,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            epochs=config.epochs,
            max_grad_norm=dp.max_grad_norm,
            accountant=dp.accountant,
            n_pairs=n_pairs,
            expected_batch_size=int(dp_optimizer.expected_batch_size),
        )
        if ledger is not None and steps:
            ledger.record(
                PrivacySpend.now(purpose=purpose, epsilon=report.epsilon, delta=report.delta, details=report.to_dict())
            )
    return report, losses


def _train_plain(
    model: nn.Module,
    dataset: Dataset,
    config: TrainingConfig,
    optimizer: torch.optim.Optimizer,
    *,
    n_inputs: int,
    ledger: PrivacyLedger | None,
    progress: bool,
    description: str,
) -> tuple[PrivacyReport, list[float]]:
    _warn_dp_off(
        f"training {description!r} WITHOUT differential privacy"
        + (f"; nothing is charged to the privacy ledger {ledger.path}" if ledger is not None else "")
    )
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True)
    losses = _run_epochs(
        model,
        optimizer,
        loader,
        n_inputs=n_inputs,
        epochs=config.epochs,
        progress=progress,
        description=description,
        epsilon_so_far=None,
    )
    report = PrivacyReport(
        dp_enabled=False,
        epsilon=math.inf,
        delta=1.0,
        noise_multiplier=0.0,
        sample_rate=config.batch_size / len(dataset),
        steps=config.epochs * len(loader),
        epochs=config.epochs,
        max_grad_norm=None,
        accountant=None,
        n_pairs=len(dataset),
        expected_batch_size=config.batch_size,
    )
    return report, losses


def _run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    n_inputs: int,
    epochs: int,
    progress: bool,
    description: str,
    epsilon_so_far: Callable[[], float] | None,
) -> list[float]:
    """Run the epochs; return the mean loss per epoch (NaN for an epoch whose batches were all empty)."""
    device = next(p for p in model.parameters() if p.requires_grad).device
    history: list[float] = []
    postfix: dict[str, str] = {}
    with tqdm(total=epochs * len(loader), desc=description, unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            loss_sum, rows = 0.0, 0
            for batch in loader:
                tensors = [t.to(device) for t in batch]
                chosen, rejected = tensors[:n_inputs], tensors[n_inputs:]
                optimizer.zero_grad(set_to_none=True)
                loss = bradley_terry_loss(model, chosen, rejected)
                # A Poisson batch can be empty (zero-row tensors). It still goes
                # through forward, backward and step: the DP optimizer adds noise
                # to a zero gradient and the accountant counts the step; skipping
                # it would reveal that the batch was empty. Its loss is the mean
                # of nothing (NaN) and stays out of the history.
                with warnings.catch_warnings():
                    # Opacus' hooks fire on layers fed by frozen features (inputs need no grad);
                    # torch warns about that once per run, which is expected here, not a fault.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                optimizer.step()
                batch_rows = chosen[0].shape[0]
                if batch_rows:
                    loss_sum += loss.item() * batch_rows
                    rows += batch_rows
                    postfix["loss"] = f"{loss.item():.4f}"
                bar.update(1)
                bar.set_postfix(postfix, refresh=False)
            history.append(loss_sum / rows if rows else math.nan)
            if progress and epsilon_so_far is not None:
                # Once per epoch: a PRV epsilon takes a fraction of a second.
                postfix["epsilon"] = f"{epsilon_so_far():.3f}"
                bar.set_postfix(postfix)
    return history


def _detach_opacus(dp_model: nn.Module, dp_optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Leave `model` exactly a plain module again: no hooks, no per-sample state, no noisy grads."""
    dp_optimizer.zero_grad(set_to_none=True)
    # Removes the grad-sample hooks and grad_sample/_forward_counter/... attributes.
    dp_model.to_standard_module()
    # Not covered by GradSampleModule.cleanup(): the DP optimizer's per-parameter
    # sum of clipped gradients, and the activation stash of each hooked layer.
    for p in model.parameters():
        if hasattr(p, "summed_grad"):
            del p.summed_grad
    for module in model.modules():
        for attr in ("activations", "max_batch_len"):
            if attr in vars(module):
                delattr(module, attr)


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


def _warn_dp_off(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)
    logger.warning(message)
