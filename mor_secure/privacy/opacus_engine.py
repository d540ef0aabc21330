"""Opacus attached to a model and taken off again: the checks, the engine with its own noise, the clean-up.

`check_dp_compatible` refuses a model DP-SGD would not cover before any
step; `prepare_private_training` builds the engine, wrapped module, DP
optimizer and Poisson loader with generators nobody can regenerate;
`detach_opacus` leaves the caller's model a plain module again.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mor_secure.privacy.accounting import quiet_accountant
from mor_secure.privacy.os_entropy import os_entropy_generator
from mor_secure.privacy.training_config import DPConfig, noise_label
from mor_secure.privacy.unprotected_state import running_statistics_problems

# Opacus warns on every engine built without secure_mode; our report states the noise source instead.
_OPACUS_SECURE_RNG_WARNING = "Secure RNG turned off"


def check_dp_compatible(model: nn.Module) -> None:
    """ValueError naming every layer of `model` that DP-SGD would not cover, and how to fix it."""
    # ModuleValidator flags layers Opacus cannot privatise (BatchNorm mixes samples);
    # GradSampleModule.validate flags trainable layers holding buffers, which make_private
    # would otherwise reject only after tagging the parameters; neither looks at frozen layers.
    opacus_errors = [*ModuleValidator.validate(model, strict=False), *GradSampleModule.validate(model, strict=False)]
    # ModuleValidator.fix skips frozen layers, so its hint is only for what Opacus itself flagged.
    hint = (". Replace the offending layers before training, e.g. `model = opacus.validators.ModuleValidator.fix("
            "model)` swaps BatchNorm for GroupNorm" if opacus_errors else "")
    problems = [str(e) for e in opacus_errors] + running_statistics_problems(model)
    if problems:
        raise ValueError("model is not compatible with DP-SGD (Opacus validators): " + "; ".join(problems) + hint)


@dataclass(frozen=True)
class PrivateTraining:
    """What `prepare_private_training` hands the training loop (and tests inspect)."""

    engine: PrivacyEngine
    module: nn.Module
    optimizer: Any
    loader: DataLoader
    noise: str


def prepare_private_training(
    model: nn.Module, units: Dataset, optimizer: torch.optim.Optimizer, dp: DPConfig, *,
    sample_rate: float, noise_multiplier: float,
) -> PrivateTraining:
    """Opacus' engine, wrapped module, DP optimizer and Poisson loader, with noise nobody can regenerate.

    Opacus draws Poisson masks and noise from torch's global generator unless
    given one (DESIGN §5), and the global generator is seeded with the
    training seed; so both get their own generators here, their whole state
    OS entropy (`os_entropy`: a seed would give one of 2^32 streams), or
    Opacus' CSPRNG in secure mode, or the explicitly insecure seed.
    """
    sampling = noise_generator = None  # secure mode: Opacus uses its CSPRNG for both
    if not dp.secure_mode:
        if dp.insecure_seeded_noise is not None:
            seed = dp.insecure_seeded_noise
            sampling, noise_generator = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
        else:
            sampling, noise_generator = os_entropy_generator(), os_entropy_generator()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_OPACUS_SECURE_RNG_WARNING)
        engine = PrivacyEngine(accountant=dp.accountant, secure_mode=dp.secure_mode)
    # Poisson sampling at the planned rate, not Opacus' 1 / len(DataLoader over the units), which would tie the
    # published rate to the private unit count; Opacus charges its accountant 1 / len(this loader), and in secure
    # mode swaps the loader's generator for its CSPRNG.
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DPDataLoader(units, sample_rate=sample_rate, generator=sampling),
        noise_multiplier=noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=False,
        noise_generator=noise_generator,
    )
    # What make_private does under its own Poisson sampling: one backward per step, never accumulated across
    # batches (the accountant counts each step as one sample of the data).
    dp_model.forbid_grad_accumulation()
    # The noisy sum is divided by this: Opacus' int(len(units) * (1 / len(loader))) would tie the released
    # weights' scale to the private unit count, so it is the planned count's, in Opacus' own arithmetic (its
    # value when no count is declared), but never 0, which its float rounding gives for 49 units in 49 batches.
    dp_optimizer.expected_batch_size = max(1, int(dp.planned_units(len(units)) * (1 / len(dp_loader))))
    return PrivateTraining(engine=engine, module=dp_model, optimizer=dp_optimizer, loader=dp_loader,
                           noise=noise_label(dp))


def epsilon_so_far(engine: PrivacyEngine, delta: float) -> float:
    """The epsilon Opacus' accountant charges for the noisy steps taken so far."""
    with quiet_accountant():
        return float(engine.accountant.get_epsilon(delta=delta))


def detach_opacus(dp_model: nn.Module, dp_optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
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
