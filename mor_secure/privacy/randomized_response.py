"""Randomized response for single bits: pure maths, no state, no ledger.

Warner's randomized response (Warner 1965, JASA 60:63-69) reports a bit
truthfully with probability e^eps / (1 + e^eps) and flipped otherwise. The
likelihood ratio of any report under the two possible true bits is then at
most e^eps, so each reported bit is epsilon-locally differentially private
(Dwork & Roth 2014, section 3.2). A silo uses it to answer "did my reward
model rank this calibration pair right?" without revealing the exact answer.
It is not charged to the silo's privacy ledger: the bits are computed by a
DP-trained model on the coordinator's PUBLIC calibration pairs, which is
post-processing of a DP output (Dwork & Roth 2014, Prop. 2.1) and costs the
silo's data nothing; randomized response only limits what the coordinator
learns about the model's behaviour, and only per report: the epsilon holds
for one answered bit, nothing bounds how often the coordinator asks about a
pair, and k reports of one pair's bit cost k x epsilon of that pair (a
majority of 101 reports at epsilon 1 recovers it). This module only does
maths, in the style of `accounting`.

The noise is known, so aggregate statistics stay estimable: the observed rate
of ones m relates to the true rate mu by m = p + mu (1 - 2p), which
`debiased_mean` inverts, and the router's training loss corrects for it the
same way (forward correction, `coordinator.router`).
"""

from __future__ import annotations

import math

import torch


def flip_probability(*, epsilon: float) -> float:
    """Probability p = 1 / (1 + e^epsilon) that a bit is reported flipped.

    This is the smallest flip rate at which a single bit is epsilon-LDP: the
    ratio (1 - p) / p equals e^epsilon exactly. Computed as e^-eps / (1 + e^-eps)
    so that a large epsilon gives a tiny p instead of an overflow.
    """
    _check_epsilon(epsilon)
    decay = math.exp(-epsilon)
    return decay / (1.0 + decay)


def randomize_bits(bits: torch.Tensor, *, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """Each bit of `bits` (bool, any shape) flipped independently with `flip_probability(epsilon)`.

    The noise is drawn from `generator` (never the global RNG), so a caller
    controls reproducibility; every product path seeds it from OS entropy,
    since anyone who knows the seed can undo the noise.
    """
    _check_bool_tensor("bits", bits)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    p = flip_probability(epsilon=epsilon)
    draws = torch.rand(bits.shape, generator=generator, device=generator.device)
    return bits ^ (draws < p).to(bits.device)


def debiased_mean(noisy_bits: torch.Tensor, *, epsilon: float) -> float:
    """Unbiased estimate of the true mean of bits reported through `randomize_bits(epsilon)`.

    E[noisy mean] = p + mu (1 - 2p), so (noisy mean - p) / (1 - 2p) has
    expectation mu. The estimate is deliberately not clipped to [0, 1]:
    clipping would bias it, and averages of several estimates (e.g. over
    rounds) are only unbiased if each one is.
    """
    _check_bool_tensor("noisy_bits", noisy_bits)
    if noisy_bits.numel() == 0:
        raise ValueError("noisy_bits is empty: the mean of no bits is undefined")
    p = flip_probability(epsilon=epsilon)
    observed = noisy_bits.double().mean().item()
    return (observed - p) / (1.0 - 2.0 * p)


def _check_bool_tensor(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        raise ValueError(
            f"{name} must be a torch.bool tensor, got {type(value).__name__}"
            + (f" of dtype {value.dtype}" if isinstance(value, torch.Tensor) else "")
        )


def _check_epsilon(epsilon: float) -> None:
    # epsilon = 0 would mean p = 1/2: a fair coin that carries no information and
    # cannot be debiased (1 - 2p = 0); infinity would mean no privacy at all.
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (
        math.isfinite(epsilon) and epsilon > 0
    ):
        raise ValueError(
            f"randomized-response epsilon must be a finite number > 0 (0 < epsilon < inf), got {epsilon!r}"
        )
