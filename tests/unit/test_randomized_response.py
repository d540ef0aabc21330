"""Randomized response: the flip rate matches Warner's 1/(1+e^eps), and the debiased mean is unbiased."""

from __future__ import annotations

import math

import pytest
import torch

from mor_secure.privacy.randomized_response import debiased_mean, flip_probability, randomize_bits


def test_flip_probability_is_warners_formula() -> None:
    assert flip_probability(epsilon=1.0) == pytest.approx(1.0 / (1.0 + math.e))
    assert flip_probability(epsilon=math.log(3.0)) == pytest.approx(0.25)
    # The epsilon-LDP likelihood ratio (1 - p) / p is exactly e^eps.
    p = flip_probability(epsilon=2.0)
    assert (1 - p) / p == pytest.approx(math.exp(2.0))
    # Large epsilon: tiny, not an overflow.
    assert 0.0 <= flip_probability(epsilon=1000.0) < 1e-300


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_empirical_flip_rate_matches(epsilon: float) -> None:
    n = 200_000
    bits = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.3
    noisy = randomize_bits(bits, epsilon=epsilon, generator=torch.Generator().manual_seed(2))
    assert noisy.dtype == torch.bool and noisy.shape == bits.shape
    p = flip_probability(epsilon=epsilon)
    # Standard error sqrt(p(1-p)/n) <= 0.0012; 5 sigma.
    assert (noisy != bits).float().mean().item() == pytest.approx(p, abs=0.006)


def test_randomize_bits_is_reproducible_from_the_generator_and_keeps_shape() -> None:
    bits = torch.zeros(4, 5, dtype=torch.bool)
    first = randomize_bits(bits, epsilon=0.1, generator=torch.Generator().manual_seed(7))
    again = randomize_bits(bits, epsilon=0.1, generator=torch.Generator().manual_seed(7))
    assert first.shape == (4, 5) and torch.equal(first, again)


def test_debiased_mean_is_unbiased() -> None:
    epsilon, true_mean, n = 1.0, 0.8, 400_000
    bits = torch.rand(n, generator=torch.Generator().manual_seed(3)) < true_mean
    noisy = randomize_bits(bits, epsilon=epsilon, generator=torch.Generator().manual_seed(4))
    naive = noisy.float().mean().item()
    p = flip_probability(epsilon=epsilon)
    assert naive == pytest.approx(p + true_mean * (1 - 2 * p), abs=0.005)  # the noisy mean is biased ...
    assert abs(naive - true_mean) > 0.1
    # ... the debiased one is not: sd of the estimate = sqrt(m(1-m)/n)/(1-2p) ~ 0.0017; 4 sigma.
    assert debiased_mean(noisy, epsilon=epsilon) == pytest.approx(bits.float().mean().item(), abs=0.007)


def test_debiased_mean_averages_to_the_truth_over_repeats() -> None:
    # Small samples, many repeats: unbiasedness, not just consistency.
    bits = torch.tensor([True] * 30 + [False] * 10)
    generator = torch.Generator().manual_seed(5)
    estimates = [debiased_mean(randomize_bits(bits, epsilon=0.7, generator=generator), epsilon=0.7)
                 for _ in range(4000)]
    assert sum(estimates) / len(estimates) == pytest.approx(0.75, abs=0.02)
    assert min(estimates) < 0.5 < 1.0 < max(estimates)  # not clipped to [0, 1]: clipping would bias it


@pytest.mark.parametrize("epsilon", [0, 0.0, -1.0, math.inf, math.nan, True, "1"])
def test_bad_epsilon_is_rejected_with_the_range(epsilon: object) -> None:
    with pytest.raises(ValueError, match=r"finite number > 0 \(0 < epsilon < inf\)"):
        flip_probability(epsilon=epsilon)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0 < epsilon < inf"):
        randomize_bits(torch.ones(3, dtype=torch.bool), epsilon=epsilon,  # type: ignore[arg-type]
                       generator=torch.Generator())
    with pytest.raises(ValueError, match="0 < epsilon < inf"):
        debiased_mean(torch.ones(3, dtype=torch.bool), epsilon=epsilon)  # type: ignore[arg-type]


def test_non_bool_or_empty_bits_are_rejected() -> None:
    with pytest.raises(ValueError, match="torch.bool tensor.*float32"):
        randomize_bits(torch.ones(3), epsilon=1.0, generator=torch.Generator())
    with pytest.raises(ValueError, match="torch.bool tensor, got list"):
        debiased_mean([True, False], epsilon=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        debiased_mean(torch.zeros(0, dtype=torch.bool), epsilon=1.0)
