"""The silo's service object: every request a silo answers goes through here, whatever the transport.

`SiloService` owns what a silo decides: input validation and limits
(`request_checks`), image decoding, scoring with its DP-trained model,
randomized response, and what it says about itself (architecture, public
privacy report, ledger summary). The in-process client
(`silo_agent.in_process`) and the gRPC servicer are thin adapters over the
same object, so both paths run the same code.

Privacy of what it answers. Scores are computed by a DP-trained model
(post-processing, no further cost). Correctness bits are about the
coordinator's PUBLIC calibration pairs: a function of a DP output and public
data, also post-processing (Dwork & Roth 2014, Prop. 2.1), so neither exact
nor randomized bits are charged to the silo's data ledger. Randomized
response is an optional extra protection of the model's behaviour; its noise
comes from OS entropy unless a simulation passes an explicit seed.

The model is not thread-safe (it keeps feature caches), and a silo serves
several connections: one lock serialises model calls, while validation and
image decoding run outside it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from mor_secure.models.digests import directory_digest
from mor_secure.models.reward_model import LocalResources, RewardModel, load_reward_model
from mor_secure.policy import RequestLimits
from mor_secure.privacy import PrivacyLedger
from mor_secure.privacy.os_entropy import os_entropy_generator
from mor_secure.privacy.randomized_response import flip_probability, randomize_bits
from mor_secure.privacy.reports import PrivacyReport
from mor_secure.wire.errors import ErrorCode, SiloError
from mor_secure.wire.messages import (
    OBJECTIVES,
    BitsReply,
    BitsRequest,
    LedgerSummary,
    ScoreReply,
    ScoreRequest,
    SiloDescription,
)

from .request_checks import (
    check_all_images_used,
    check_count,
    check_epsilon,
    check_image_index,
    check_objective,
    check_text,
    check_weights,
    decode_images,
)
from .training import REPORT_FILE

logger = logging.getLogger(__name__)


class SiloService:
    """One silo's answers to the coordinator: describe, score, correctness bits."""

    def __init__(self, name: str, model: RewardModel, *, limits: RequestLimits | None = None,
                 privacy_report: PrivacyReport | None = None,
                 ledger_summary: Callable[[], LedgerSummary | None] | None = None,
                 randomized_response_seed: int | None = None,
                 allowed_objectives: frozenset[str] = frozenset(OBJECTIVES), max_weight: float = 1.0) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"silo name must be a non-empty string, got {name!r}")
        if not isinstance(model, RewardModel):
            raise ValueError(f"model must be a RewardModel, got {type(model).__name__}")
        self._name = name
        self._model = model
        # Text the model's tokenizer would read as control tokens (lora_vlm's `reserved_text`; others have none).
        self._reserved_text = tuple(getattr(model, "reserved_text", ()))
        self.limits = limits or RequestLimits()
        self.allowed_objectives = frozenset(allowed_objectives)
        self.max_weight = max_weight
        self._privacy_report = privacy_report
        self._ledger_summary = ledger_summary
        self._model_lock = threading.Lock()
        # OS entropy, the whole generator state (a seed would give one of 2^32 streams, which the bits of pairs whose
        # truth the caller knows would find), unless a simulation asks for reproducible noise (voiding the protection).
        self._generator = (os_entropy_generator() if randomized_response_seed is None
                           else torch.Generator().manual_seed(randomized_response_seed))

    @property
    def name(self) -> str:
        return self._name

    @property
    def privacy_report(self) -> PrivacyReport | None:
        """The public privacy report this service publishes (None: no privacy claim)."""
        return self._privacy_report

    def describe(self) -> SiloDescription:
        """Architecture, trainable-parameter count, public privacy report, ledger summary."""
        return SiloDescription(name=self._name, architecture=self._model.architecture,
                               trainable_params=self._model.trainable_parameters(),
                               privacy_report=self._privacy_report,
                               ledger=None if self._ledger_summary is None else self._ledger_summary())

    def score(self, request: ScoreRequest) -> ScoreReply:
        """Standardised scores, one per row (times the row's weight if the request has weights).

        SiloError(INVALID_ARGUMENT) naming the problem on bad input.
        """
        limits = self.limits
        check_objective(request.objective, self.allowed_objectives)
        check_count("rows", len(request.rows), limits.max_items)
        check_count("images", len(request.images), limits.max_images)  # before an index is read against them
        weights = check_weights(request.weights, len(request.rows), self.max_weight)
        used: set[int] = set()
        prompts, responses = [], []
        for index, row in enumerate(request.rows):
            used.add(check_image_index("rows", index, row.image, len(request.images)))
            prompts.append(check_text("prompts", index, row.prompt, limits, self._reserved_text))
            responses.append(check_text("responses", index, row.response, limits, self._reserved_text))
        check_all_images_used(used, len(request.images))
        images = decode_images(request.images, limits)  # the costliest check last: up to max_request_pixels
        row_images = [images[row.image] for row in request.rows]
        with self._model_lock:
            scores = self._checked(self._model.score(row_images, prompts, responses), len(responses))
        if weights is not None:
            scores = tuple(w * s for w, s in zip(weights, scores, strict=True))
        return ScoreReply(scores=scores)

    def correctness_bits(self, request: BitsRequest) -> BitsReply:
        """One bit per public pair (chosen scored strictly above rejected), optionally via randomized response.

        Every input (epsilon included) is validated before any score is computed.
        """
        limits = self.limits
        check_objective(request.objective, self.allowed_objectives)
        epsilon = check_epsilon(request.randomized_response_epsilon)
        check_count("pairs", len(request.pairs), limits.max_items)
        check_count("images", len(request.images), limits.max_images)  # before an index is read against them
        used: set[int] = set()
        prompts, chosen, rejected = [], [], []
        for index, pair in enumerate(request.pairs):
            used.add(check_image_index("pairs", index, pair.image, len(request.images)))
            prompts.append(check_text("prompts", index, pair.prompt, limits, self._reserved_text))
            chosen.append(check_text("chosen", index, pair.chosen, limits, self._reserved_text))
            rejected.append(check_text("rejected", index, pair.rejected, limits, self._reserved_text))
        check_all_images_used(used, len(request.images))
        images = decode_images(request.images, limits)  # the costliest check last, as in `score`
        row_images = [images[pair.image] for pair in request.pairs]
        with self._model_lock:
            # One batched call for both sides: [chosen..., rejected...]; raw scores rank exactly like standardised.
            raw = self._model.raw_scores(row_images * 2, prompts * 2, chosen + rejected)
            raw = torch.tensor(self._checked(raw, 2 * len(chosen)))
            bits = raw[: len(chosen)] > raw[len(chosen):]
            if epsilon is not None:
                bits = randomize_bits(bits, epsilon=epsilon, generator=self._generator)
        return BitsReply(bits=tuple(bool(b) for b in bits.tolist()),
                         flip_probability=None if epsilon is None else flip_probability(epsilon=epsilon))

    def _checked(self, scores: torch.Tensor, rows: int) -> tuple[float, ...]:
        # A model returning the wrong shape or NaN is the silo's bug: say so, never send a poisoned score.
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (rows,):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise SiloError(ErrorCode.INTERNAL, f"silo {self._name!r}: reward model returned {shape}, "
                            f"expected {rows} scores")
        values = tuple(float(v) for v in scores.detach().float().cpu().tolist())
        if not all(math.isfinite(v) for v in values):
            raise SiloError(ErrorCode.INTERNAL, f"silo {self._name!r}: reward model returned non-finite scores")
        return values


def ledger_summary(ledger: PrivacyLedger) -> LedgerSummary:
    """The public state of a ledger, read fresh (another job of the silo may have spent since)."""
    return LedgerSummary(epsilon_budget=ledger.epsilon_budget, delta_budget=ledger.delta_budget,
                         epsilon_spent=ledger.spent_epsilon, delta_spent=ledger.spent_delta,
                         charges=len(ledger.charges), open_reservations=len(ledger.open_reservations),
                         head_digest=ledger.head_digest)


def published_privacy_report(path: Path, model_dir: Path) -> PrivacyReport | None:
    """The public privacy report a training job wrote next to `model_dir` (None when there is none).

    ValueError when it does not describe exactly those weights: a claim about
    another run's model (or a half-written one) is never published. A report
    from before reports named their weights is not published either (None).
    """
    if not path.is_file():
        return None
    retrain = "train again (`mor silo train`) so that model and report are of one run"
    try:
        published = json.loads(path.read_text(encoding="utf-8"))
        report, described = PrivacyReport.from_dict(published["privacy"]), published.get("model_digest")
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a complete privacy report ({error}); {retrain}") from None
    if described is None:  # written before reports named their weights: true then, unverifiable now
        logger.warning("%s names no model_digest (a report from before 2026-12-04), so nothing ties it to the "
                       "weights in %s: published without a privacy claim; %s", path, model_dir, retrain)
        return None
    if described != directory_digest(model_dir):
        raise ValueError(f"{path} does not describe the weights in {model_dir} (the job that wrote them did not "
                         f"finish writing its report, or an older job wrote this one); {retrain}")
    return report


def open_model_service(name: str, model_dir: str | Path, *, resources: LocalResources | None = None,
                       limits: RequestLimits | None = None, randomized_response_seed: int | None = None,
                       ledger: PrivacyLedger | None = None,
                       allowed_objectives: frozenset[str] = frozenset(OBJECTIVES),
                       max_weight: float = 1.0) -> SiloService:
    """A service over a saved reward model and the public privacy report beside it (refused if not that model's)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"silo {name!r}: reward model directory {model_dir} not found; "
                                "train it first (`mor silo train --config <silo>.yaml`)")
    report = published_privacy_report(model_dir.parent / REPORT_FILE, model_dir)
    model = load_reward_model(model_dir, resources)
    return SiloService(name, model, limits=limits, privacy_report=report,
                       ledger_summary=None if ledger is None else (lambda: ledger_summary(ledger)),
                       randomized_response_seed=randomized_response_seed, allowed_objectives=allowed_objectives,
                       max_weight=max_weight)
