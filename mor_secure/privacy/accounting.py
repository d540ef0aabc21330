"""Pure privacy maths for DP-SGD with Poisson sampling: no state, no I/O.

Both functions build a fresh Opacus accountant for every call, so they answer
"what would this run cost / need" without touching any training in progress.
The history format is Opacus's own: ``[(noise_multiplier, sample_rate, steps)]``
for the Poisson-subsampled Gaussian mechanism.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

# "rdp": Renyi DP (Mironov 2017; Mironov, Talwar, Zhang 2019), a fast upper bound.
# "prv": numerical composition of privacy loss random variables (Gopi, Lee,
# Wutschitz 2021, arXiv:2106.02848), a tighter bound; Opacus's default.
Accountant = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[Accountant, ...] = get_args(Accountant)
# Opacus' RDP analysis warns when the best Renyi order is the largest it tries. The bound is still valid
# (at worst loose), and the PRV accountant runs that analysis on every epsilon it computes: a warning per
# call that tells a silo operator nothing.
_RDP_LARGEST_ORDER_WARNING = "Optimal order is the largest alpha"
# How close below its target a run's epsilon lands (opacus.accountants.utils.get_noise_multiplier's default); a
# target below 1 gets 1% of itself instead, or the tolerance would be as large as the target.
DEFAULT_EPSILON_TOLERANCE = 0.01


@contextmanager
def quiet_accountant() -> Iterator[None]:
    """Silence only Opacus' largest-Renyi-order warning inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RDP_LARGEST_ORDER_WARNING)
        yield


@dataclass(frozen=True)
class PoissonSchedule:
    """How Opacus' Poisson loader samples one epoch of `n_units`, and the rate its accountant charges."""

    sampler_rate: float  # each unit joins each batch with this probability: 1 / ceil(n_units / batch_size)
    steps_per_epoch: int  # int(1 / sampler_rate) batches per epoch
    accounted_rate: float  # 1 / steps_per_epoch: what make_private hands its accountant, >= sampler_rate


def poisson_schedule(*, n_units: int, batch_size: int) -> PoissonSchedule:
    """The Poisson schedule of `batch_size` over `n_units` (the planned count: `DPConfig.planned_units`).

    Units are drawn at 1 / ceil(n_units / batch_size) (Opacus' rate for a
    DataLoader of that many batches) for int(1 / that rate) steps, which
    float rounding makes one fewer for some counts (92 for 93, 98 for 99, 104
    for 105, ...), and Opacus charges its accountant 1 / len(its loader).
    Noise planned at `accounted_rate` for `steps_per_epoch` steps is what the
    accountant will report; the true guarantee, at `sampler_rate`, is no worse.
    """
    if batch_size < 1 or n_units < 1:
        raise ValueError(f"n_units and batch_size must be >= 1, got {n_units!r} and {batch_size!r}")
    sampler_rate = 1 / math.ceil(n_units / batch_size)
    steps_per_epoch = int(1 / sampler_rate)
    return PoissonSchedule(sampler_rate=sampler_rate, steps_per_epoch=steps_per_epoch,
                           accounted_rate=1 / steps_per_epoch)


def epsilon_spent(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant,
) -> float:
    """Epsilon of `steps` DP-SGD steps at (`noise_multiplier`, `sample_rate`), for `delta`.

    Used to plan a run before it starts and to check an accountant's answer
    independently of the engine that trained the model.
    """
    _check_noise_multiplier(noise_multiplier)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    _check_delta(delta, name="delta")
    _check_accountant(accountant)
    acct = create_accountant(mechanism=accountant)
    acct.history = [(noise_multiplier, sample_rate, steps)]
    with quiet_accountant():
        return float(acct.get_epsilon(delta=delta))


def noise_multiplier_for(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant,
    epsilon_tolerance: float | None = None,
) -> float:
    """Smallest noise multiplier (to `epsilon_tolerance`) whose run spends at most `target_epsilon`.

    Wraps Opacus's binary search, which returns the upper end of its bracket:
    the epsilon of the returned noise is <= target_epsilon and within
    `epsilon_tolerance` of it: by default Opacus's 0.01, or 1% of a target
    below 1 (a silo asking for epsilon 0.01 was refused with "epsilon_tolerance
    must be in (0, target_epsilon=0.01)", a parameter it never set).
    """
    if epsilon_tolerance is None and math.isfinite(target_epsilon) and target_epsilon > 0:
        epsilon_tolerance = min(DEFAULT_EPSILON_TOLERANCE, target_epsilon / 100)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    _check_delta(target_delta, name="target_delta")
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    _check_accountant(accountant)
    if not (math.isfinite(epsilon_tolerance) and 0 < epsilon_tolerance < target_epsilon):
        raise ValueError(
            f"epsilon_tolerance must be in (0, target_epsilon={target_epsilon}), got {epsilon_tolerance!r}"
        )
    try:
        with quiet_accountant():
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
    except ValueError as exc:
        # Opacus gives up above a noise multiplier of 1e6 ("The privacy budget is too low.").
        raise ValueError(
            f"no noise multiplier reaches epsilon={target_epsilon} at delta={target_delta} "
            f"for {steps} steps at sample_rate={sample_rate} ({exc}); raise the target epsilon, "
            "train for fewer epochs, or use a smaller batch size"
        ) from exc
    return float(sigma)


def _check_noise_multiplier(noise_multiplier: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")


def _check_sample_rate(sample_rate: float) -> None:
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_delta(delta: float, *, name: str) -> None:
    if not (0 < delta < 1):
        raise ValueError(f"{name} must be in (0, 1), got {delta!r}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
