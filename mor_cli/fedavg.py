"""The pure pieces of FedAvg (McMahan et al. 2017) over DP reward models: weight states, their pair-weighted
mean, and the DP-SGD noise that keeps all rounds within a silo's target (`mor_cli.baselines` runs them)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mor_secure.privacy import DPConfig
from mor_secure.privacy.accounting import epsilon_spent, noise_multiplier_for, poisson_schedule


@dataclass(frozen=True)
class NoisePlan:
    """DP-SGD noise of one silo in FedAvg: the same noise every round, planned for all rounds together."""

    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    round_epsilon: float
    total_epsilon: float


def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """Copies of the parameters DP-SGD updates (requires_grad), by name."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def frozen_state(module: nn.Module) -> dict[str, Tensor]:
    """Copies of the parameters and buffers training must not change."""
    frozen = {name: p.detach().clone() for name, p in module.named_parameters() if not p.requires_grad}
    frozen.update({f"buffer:{name}": b.detach().clone() for name, b in module.named_buffers()})
    return frozen


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """sum_k w_k state_k / sum_k w_k, key by key, computed in float64 and returned in each tensor's dtype."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state and at least one state, got {len(states)} states "
                         f"and {len(weights)} weights")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"weights must be finite and > 0, got {list(weights)}")
    keys = set(states[0])
    for state in states[1:]:
        if set(state) != keys:
            raise ValueError(f"states hold different parameters: {sorted(keys ^ set(state))}")
    total = float(sum(weights))
    out: dict[str, Tensor] = {}
    for key in states[0]:
        shapes = {tuple(s[key].shape) for s in states}
        if len(shapes) > 1:
            raise ValueError(f"parameter {key!r} has different shapes across states: {sorted(shapes)}")
        mean = sum(s[key].to(torch.float64) * (w / total) for s, w in zip(states, weights, strict=True))
        out[key] = mean.to(states[0][key].dtype)
    return out


def plan_fedavg_noise(*, n_units: int, batch_size: int, rounds: int, local_epochs: int, dp: DPConfig) -> NoisePlan:
    """One noise multiplier for every round such that all rounds together spend at most dp.target_epsilon.

    `train_bradley_terry` calibrates noise for one run from a target epsilon, so each round is given
    the per-round epsilon of the all-rounds noise; the noise it then picks is, by monotonicity, at least
    that noise. That pick is recomputed here and the all-rounds epsilon checked before any step.
    Releasing the global model after each round is post-processing; rounds compose adaptively.
    """
    # Planned as dp_training._train_private plans a run: at the rate Opacus' accountant charges, for the public
    # unit count when the silo declares one.
    schedule = poisson_schedule(n_units=dp.planned_units(n_units), batch_size=batch_size)
    sample_rate = schedule.accounted_rate
    steps_per_round = local_epochs * schedule.steps_per_epoch
    total_steps = rounds * steps_per_round
    common = {"target_delta": dp.target_delta, "sample_rate": sample_rate, "accountant": dp.accountant}
    sigma = noise_multiplier_for(target_epsilon=dp.target_epsilon, steps=total_steps, **common)
    round_epsilon = epsilon_spent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps_per_round,
                                  delta=dp.target_delta, accountant=dp.accountant)
    run_sigma = noise_multiplier_for(target_epsilon=round_epsilon, steps=steps_per_round, **common)
    total = epsilon_spent(noise_multiplier=run_sigma, sample_rate=sample_rate, steps=total_steps,
                          delta=dp.target_delta, accountant=dp.accountant)
    if total > dp.target_epsilon:
        raise RuntimeError(f"planned FedAvg noise {run_sigma} spends epsilon {total} over {rounds} rounds, "
                           f"above the target {dp.target_epsilon}; report this as a bug")
    return NoisePlan(sample_rate, steps_per_round, run_sigma, round_epsilon, total)
