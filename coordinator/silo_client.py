"""How the coordinator talks to a silo: one protocol, an in-process implementation.

The router and GRPO code call `SiloClient` only, so a networked client (gRPC
over mTLS, later) slots in without changing them. `InProcessSiloClient` wraps
a `RewardModel` directly: it is what tests, the demo and single-machine
benchmarks use, and it enforces the same rules a silo agent will — inputs
validated, randomized response charged to the silo's ledger before anything
is answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from mor_secure.data.records import PreferencePair
from mor_secure.models.reward_model import RewardModel
from mor_secure.privacy.ledger import PrivacyLedger, PrivacySpend
from mor_secure.privacy.randomized_response import flip_probability, randomize_bits

# Ledger purpose of a randomized-response answer to a correctness-bits query.
RANDOMIZED_RESPONSE_PURPOSE = "answer:correctness-bits:randomized-response"


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
        randomized response and the silo charges that epsilon to its ledger
        before answering (raising `BudgetExceededError` if it cannot afford it).
        """
        ...


class InProcessSiloClient:
    """A `SiloClient` over a `RewardModel` living in this process.

    `seed` makes the randomized-response noise reproducible, which simulations
    and tests need; `seed=None` seeds from OS entropy, as a silo serving a
    real coordinator must (whoever knows the seed can remove the noise). The
    generator is created once, so successive calls draw fresh noise.
    """

    def __init__(self, name: str, model: RewardModel, *, ledger: PrivacyLedger | None = None,
                 seed: int | None = 0) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"silo name must be a non-empty string, got {name!r}")
        if not isinstance(model, RewardModel):
            raise ValueError(f"model must be a RewardModel, got {type(model).__name__}")
        if ledger is not None and not isinstance(ledger, PrivacyLedger):
            raise ValueError(f"ledger must be a PrivacyLedger or None, got {type(ledger).__name__}")
        self._name = name
        self._model = model
        self._ledger = ledger
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    @property
    def name(self) -> str:
        return self._name

    @property
    def ledger(self) -> PrivacyLedger | None:
        """The silo's privacy ledger, if it has one (only needed for randomized response)."""
        return self._ledger

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

        Privacy: the charge is `randomized_response_epsilon` once per call.
        Each calibration pair touches one record, so the per-pair mechanisms
        compose in parallel over pairs; a second call on the same pairs is a
        second mechanism and is charged again. The spend is recorded before
        any score is computed: a refused request reveals nothing and costs no
        compute, and a request that fails after being charged errs on the
        side of over-counting, never under-counting.
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
            p = flip_probability(epsilon=randomized_response_epsilon)  # validates epsilon
            if self._ledger is None:
                raise RuntimeError(
                    f"silo {self._name!r} has no privacy ledger, so it cannot charge a randomized-response "
                    "answer; build the client with ledger=PrivacyLedger(...)"
                )
            self._ledger.record(PrivacySpend.now(
                purpose=RANDOMIZED_RESPONSE_PURPOSE,
                epsilon=float(randomized_response_epsilon),
                delta=0.0,
                details={"mechanism": "randomized_response", "flip_probability": p, "pairs": len(pairs),
                         "composition": "parallel over pairs (one record per pair)"},
            ))

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
