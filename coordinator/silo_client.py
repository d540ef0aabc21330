"""How the coordinator talks to a silo: one protocol, an in-process implementation.

The router and GRPO code call `SiloClient` only, so a networked client (gRPC
over mTLS, later) slots in without changing them. `InProcessSiloClient` wraps
a `RewardModel` directly: it is what tests, the demo and single-machine
benchmarks use, and it enforces the same rules a silo agent will: inputs
validated, and randomized-response noise drawn from OS entropy unless a test
asks otherwise.

Privacy of correctness bits. The pairs asked about are the coordinator's
PUBLIC calibration pairs, and the answer is computed only from them and from
the silo's DP-trained reward model. A function of a DP output and of public
data is post-processing (Dwork & Roth 2014, Prop. 2.1): it cannot weaken the
guarantee the silo's training ledger already accounts for, so neither exact
nor randomized bits are charged to it. Randomized response is an optional
extra: it limits what the coordinator learns about the silo's *model* (its
behaviour on any given pair), which the silo's data budget does not cover
and does not need to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from mor_secure.data.records import PreferencePair
from mor_secure.models.reward_model import RewardModel
from mor_secure.privacy.randomized_response import flip_probability, randomize_bits


@dataclass(frozen=True)
class SiloDescription:
    """What a silo says about itself: enough to label results, nothing about its data."""

    name: str
    architecture: str
    trainable_params: int


@runtime_checkable
class SiloClient(Protocol):
    """The coordinator's view of one silo."""

    @property
    def name(self) -> str:
        """The silo's name (as in its certificate)."""
        ...

    def describe(self) -> SiloDescription:
        """Name, reward-model architecture and trainable-parameter count."""
        ...

    def score(self, images: Sequence[str | Path], prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Standardised scores (float, shape [N]), one per row.

        All completions of a step come in ONE call: a round trip per row would
        dominate a networked silo's cost, and the silo's rate caps count calls.
        """
        ...

    def correctness_bits(
        self, pairs: Sequence[PreferencePair], *, randomized_response_epsilon: float | None = None
    ) -> torch.Tensor:
        """Bool per pair: did the silo's model score `chosen` strictly above `rejected`?

        With `randomized_response_epsilon`, each bit is reported through
        randomized response (flipped with probability 1 / (1 + e^epsilon)), an
        optional protection of the model's behaviour. Nothing is charged to
        the silo's privacy ledger either way: the bits are post-processing of
        a DP-trained model on public pairs (see the module docstring).
        """
        ...


class InProcessSiloClient:
    """A `SiloClient` over a `RewardModel` living in this process.

    The randomized-response noise comes from a generator seeded from OS
    entropy (`seed=None`, the default), as a silo serving a real coordinator
    must: whoever knows the seed can remove the noise. An explicit `seed` is
    for tests and simulations only, where reproducible noise is the point;
    it voids the protection randomized response is there to give. The
    generator is created once, so successive calls draw fresh noise.
    """

    def __init__(self, name: str, model: RewardModel, *, seed: int | None = None) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"silo name must be a non-empty string, got {name!r}")
        if not isinstance(model, RewardModel):
            raise ValueError(f"model must be a RewardModel, got {type(model).__name__}")
        self._name = name
        self._model = model
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    @property
    def name(self) -> str:
        return self._name

    def describe(self) -> SiloDescription:
        return SiloDescription(name=self._name, architecture=self._model.architecture,
                               trainable_params=self._model.trainable_parameters())

    def score(self, images: Sequence[str | Path], prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Standardised scores, shape [N]; ValueError naming the problem on bad input."""
        _check_rows(images, prompts, responses)
        scores = self._model.score(list(images), list(prompts), list(responses))
        return _checked_scores(scores, len(images), self._name)

    def correctness_bits(
        self, pairs: Sequence[PreferencePair], *, randomized_response_epsilon: float | None = None
    ) -> torch.Tensor:
        """Bool per pair (chosen scored strictly above rejected), optionally via randomized response.

        Privacy: no ledger charge. The pairs are public and the model is
        DP-trained, so the exact bits are post-processing of a DP output
        (Dwork & Roth 2014, Prop. 2.1) and cost the silo's data nothing, however
        often they are asked. With `randomized_response_epsilon` each bit is
        also epsilon-LDP with respect to the model's own answer on that pair:
        protection of the model's behaviour, not of training data, so it is
        not an entry of the data budget. Inputs (epsilon included) are
        validated before any score is computed.
        """
        pairs = list(pairs)
        if not pairs:
            raise ValueError("correctness_bits needs at least one pair")
        for index, pair in enumerate(pairs):
            if not isinstance(pair, PreferencePair):
                raise ValueError(f"pairs[{index}] is a {type(pair).__name__}, expected a PreferencePair")
        images = [p.image_path for p in pairs]
        prompts = [p.prompt for p in pairs]
        _check_rows(images, prompts, [p.chosen for p in pairs], what="chosen")
        _check_rows(images, prompts, [p.rejected for p in pairs], what="rejected")

        if randomized_response_epsilon is not None:
            flip_probability(epsilon=randomized_response_epsilon)  # validates epsilon before any scoring

        # One batched call for both sides: [chosen..., rejected...].
        raw = self._model.raw_scores(images * 2, prompts * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        raw = _checked_scores(raw, 2 * len(pairs), self._name)
        bits = raw[: len(pairs)] > raw[len(pairs):]
        if randomized_response_epsilon is not None:
            bits = randomize_bits(bits, epsilon=randomized_response_epsilon, generator=self._generator)
        return bits


def _check_rows(images: Sequence[str | Path], prompts: Sequence[str], responses: Sequence[str], *,
                what: str = "responses") -> None:
    for label, column in (("images", images), ("prompts", prompts), (what, responses)):
        if isinstance(column, (str, bytes)) or not isinstance(column, Sequence):
            raise ValueError(f"{label} must be a sequence (list or tuple), got {type(column).__name__}")
    if not (len(images) == len(prompts) == len(responses)):
        raise ValueError(
            f"images, prompts and {what} must have one entry per row, got lengths "
            f"{len(images)}, {len(prompts)}, {len(responses)}"
        )
    if not images:
        raise ValueError("nothing to score: images, prompts and responses are empty")
    for label, column in (("prompts", prompts), (what, responses)):
        for index, text in enumerate(column):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{label}[{index}] must be a non-empty string, got {text!r}")
    for index, image in enumerate(images):
        if not isinstance(image, (str, Path)) or not str(image).strip():
            raise ValueError(f"images[{index}] must be a non-empty path, got {image!r}")


def _checked_scores(scores: torch.Tensor, rows: int, silo: str) -> torch.Tensor:
    # A model that returns the wrong shape or NaN must fail here, not poison a fused reward later.
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (rows,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise RuntimeError(f"silo {silo!r}: reward model returned {shape}, expected {rows} scores")
    scores = scores.detach().float().cpu()
    if not torch.isfinite(scores).all():
        raise RuntimeError(f"silo {silo!r}: reward model returned non-finite scores")
    return scores
