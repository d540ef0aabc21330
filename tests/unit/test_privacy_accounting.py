"""Privacy maths: the two accountants agree, and noise planning round-trips."""

from __future__ import annotations

import math

import pytest

from mor_secure.privacy.accounting import epsilon_spent, noise_multiplier_for

# A CIFAR-scale run: 6000 pairs, expected batch 256, 30 epochs.
SAMPLE_RATE = 256 / 6000
STEPS = 30 * round(1 / SAMPLE_RATE)


def test_rdp_and_prv_agree_within_ten_percent() -> None:
    rdp = epsilon_spent(noise_multiplier=1.0, sample_rate=SAMPLE_RATE, steps=STEPS, delta=1e-5, accountant="rdp")
    prv = epsilon_spent(noise_multiplier=1.0, sample_rate=SAMPLE_RATE, steps=STEPS, delta=1e-5, accountant="prv")
    assert STEPS == 690
    assert rdp == pytest.approx(8.22, rel=0.01)
    # PRV is the tighter bound, and both bound the same mechanism.
    assert prv < rdp
    assert abs(rdp - prv) / max(rdp, prv) < 0.10


def test_more_noise_spends_less() -> None:
    common = dict(sample_rate=SAMPLE_RATE, steps=STEPS, delta=1e-5, accountant="rdp")
    assert epsilon_spent(noise_multiplier=2.0, **common) < epsilon_spent(noise_multiplier=1.0, **common)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_multiplier_for_round_trips(accountant: str) -> None:
    plan = dict(sample_rate=0.1, steps=100, accountant=accountant)
    sigma = noise_multiplier_for(target_epsilon=4.0, target_delta=1e-5, **plan)
    eps = epsilon_spent(noise_multiplier=sigma, delta=1e-5, **plan)
    assert sigma > 0.5
    # Opacus returns the upper end of its bracket: at most the target, within the tolerance.
    assert 4.0 - 0.01 <= eps <= 4.0


def test_a_target_epsilon_at_the_default_tolerance_gets_a_tolerance_of_its_own() -> None:
    """The tolerance was Opacus's 0.01 whatever the target: `target_epsilon: 0.01` failed with "epsilon_tolerance
    must be in (0, target_epsilon=0.01)", a parameter the silo never set (operator walkthrough helper-76)."""
    plan = dict(sample_rate=0.1, steps=100, accountant="prv")  # RDP cannot certify an epsilon this small at all
    sigma = noise_multiplier_for(target_epsilon=0.01, target_delta=1e-5, **plan)
    assert 0.0099 <= epsilon_spent(noise_multiplier=sigma, delta=1e-5, **plan) <= 0.01


def test_noise_multiplier_for_explains_an_impossible_target() -> None:
    with pytest.raises(ValueError, match="no noise multiplier reaches epsilon=1e-09"):
        noise_multiplier_for(target_epsilon=1e-9, target_delta=1e-9, sample_rate=1.0, steps=10_000,
                             accountant="rdp", epsilon_tolerance=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(noise_multiplier=0.0), r"noise_multiplier must be a finite number > 0, got 0.0"),
        (dict(noise_multiplier=math.nan), r"noise_multiplier must be a finite number > 0"),
        (dict(sample_rate=1.5), r"sample_rate must be in \(0, 1\], got 1.5"),
        (dict(sample_rate=0.0), r"sample_rate must be in \(0, 1\]"),
        (dict(steps=0), r"steps must be an integer >= 1, got 0"),
        (dict(steps=2.5), r"steps must be an integer >= 1"),
        (dict(delta=1.0), r"delta must be in \(0, 1\), got 1.0"),
        (dict(delta=math.nan), r"delta must be in \(0, 1\)"),
        (dict(accountant="gdp"), r"accountant must be one of \('rdp', 'prv'\), got 'gdp'"),
    ],
)
def test_epsilon_spent_rejects_bad_input(kwargs: dict, message: str) -> None:
    args = dict(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5, accountant="rdp") | kwargs
    with pytest.raises(ValueError, match=message):
        epsilon_spent(**args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target_epsilon=0.0), r"target_epsilon must be a finite number > 0"),
        (dict(target_epsilon=math.inf), r"target_epsilon must be a finite number > 0"),
        (dict(target_delta=0.0), r"target_delta must be in \(0, 1\)"),
        (dict(epsilon_tolerance=5.0), r"epsilon_tolerance must be in \(0, target_epsilon=4.0\)"),
    ],
)
def test_noise_multiplier_for_rejects_bad_input(kwargs: dict, message: str) -> None:
    args = dict(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.1, steps=10, accountant="rdp") | kwargs
    with pytest.raises(ValueError, match=message):
        noise_multiplier_for(**args)
