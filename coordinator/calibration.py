"""Router calibration: public calibration pairs -> per-silo correctness bits -> a trained router (DESIGN §2.2).

The coordinator holds the public calibration split (images, questions,
answers). For every objective it builds preference pairs from it, asks each
silo ONE batched question per objective ("which of these pairs do you rank
right?", optionally answered through randomized response) and fits the router
to the bits.

Privacy. The pairs are public and each silo's model is DP-trained, so the
bits are post-processing of a DP output (Dwork & Roth 2014, Prop. 2.1) and
are charged to no silo's ledger. Randomized response is optional extra
protection of each model's behaviour (it bounds what the coordinator learns
about how a silo's model ranks any one pair); its noise is drawn by the silo,
from OS entropy unless a test seeds the client. `seed` below seeds only the
coordinator's own choices (subsample, rejected answers), never that noise.

Objectives. The benchmark needs at least two, so that routing *by objective*
is exercised:

- ``correct``: chosen = the true one-word answer, rejected = a wrong answer of
  the same kind. The silo that is right is the one reliable on that kind.
- ``correct_and_brief``: chosen = the true one-word answer; rejected = a wrong
  one-word answer on half of the pairs and the true answer padded with words
  ("the answer is blue") on the other half. A silo that is right here must
  also prefer the terse answer, which no silo was trained for, so the router
  learns different weights for this objective than for ``correct``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from mor_secure.config import StrictModel
from mor_secure.data import QUESTION_KINDS, PreferencePair, QuestionKind, VQARecord, make_pairs
from mor_secure.privacy.randomized_response import debiased_mean
from mor_secure.transport.authorization import AuditSink
from mor_secure.wire.client import SiloClient
from mor_secure.wire.messages import OBJECTIVES as WIRE_OBJECTIVES

from .answer_eval import balanced_sample
from .router import Router, RouterConfig, RouterFeatures, train_router
from .audit_trail import new_round_id, record_round
from .silo_requests import bits_requests, send_bits

Objective = Literal["correct", "correct_and_brief"]
OBJECTIVES: tuple[str, ...] = tuple(WIRE_OBJECTIVES)  # what a silo's policy may allow (mor_secure.wire)

# Padded forms of a correct answer: right, but not brief.
_VERBOSE_TEMPLATES = ("the answer is {answer}", "i think it is {answer}", "{answer}, i am fairly sure")


class CalibrationConfig(StrictModel):
    """How the router is calibrated (`mor coordinator train-router --config`)."""

    objectives: list[Objective] = Field(
        default_factory=lambda: list(OBJECTIVES),
        description="Objectives the router learns weights for; GRPO then optimises one of them.",
    )
    max_records_per_kind: int | None = Field(
        600, gt=0,
        description="Cap on calibration questions per kind (seeded subsample); easy-VQA is 74% yes/no, and "
        "a capped, balanced set costs the silos fewer scores. null = use every question.",
    )
    exclude_kinds: list[QuestionKind] = Field(
        default_factory=list,
        description="Question kinds left out of calibration (the leave-one-silo-out experiment).",
    )
    randomized_response_epsilon: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="When set, each silo answers its bits through randomized response at this epsilon (each "
        "bit flipped with probability 1 / (1 + e^epsilon)): optional protection of the silo's model behaviour, per "
        "report (a pair asked k times costs k x epsilon; nothing bounds how often), not charged to its privacy "
        "ledger, since bits on public pairs from a DP-trained model are post-processing. "
        "The router's loss is forward-corrected for the flips. null = exact bits.",
    )
    seed: int = Field(0, description="Seed of the subsample and of the rejected answers drawn (the coordinator's "
                      "public choices; the silos' randomized-response noise is not seeded by it).")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Router size and training schedule.")

    @field_validator("objectives")
    @classmethod
    def _distinct_objectives(cls, objectives: list[str]) -> list[str]:
        if not objectives or len(set(objectives)) != len(objectives):
            raise ValueError(f"objectives must be a non-empty list without repeats, got {objectives}; "
                             f"choose from {list(OBJECTIVES)}")
        return objectives

    @field_validator("exclude_kinds")
    @classmethod
    def _keep_a_kind(cls, kinds: list[str]) -> list[str]:
        if set(kinds) >= set(QUESTION_KINDS):
            raise ValueError(f"exclude_kinds {kinds} leaves no calibration data; keep at least one of "
                             f"{list(QUESTION_KINDS)}")
        return kinds


@dataclass(frozen=True)
class CalibrationResult:
    """The trained router and what the bits said (the coordinator's own view; no silo score is kept)."""

    router: Router
    records: int
    silo_accuracy: dict[str, dict[str, dict[str, float]]]  # objective -> silo -> kind -> share ranked right (debiased under RR)

    def to_dict(self) -> dict:
        return {"records": self.records, "silos": list(self.router.silo_names),
                "objectives": list(self.router.objective_names), "silo_accuracy": self.silo_accuracy}


def calibration_records(records: Sequence[VQARecord], config: CalibrationConfig) -> list[VQARecord]:
    """The calibration questions used: excluded kinds dropped, at most `max_records_per_kind` per kind."""
    kept = [r for r in records if r.kind not in config.exclude_kinds]
    if not kept:
        raise ValueError("no calibration records left after exclude_kinds")
    return balanced_sample(kept, config.max_records_per_kind, seed=config.seed)


def objective_pairs(records: Sequence[VQARecord], objective: str, *, seed: int) -> list[PreferencePair]:
    """One clean pair per record for `objective` (see the module docstring)."""
    pairs = list(make_pairs(records, seed=seed))
    if objective == "correct":
        return pairs
    if objective != "correct_and_brief":
        raise ValueError(f"unknown objective {objective!r}; known: {list(OBJECTIVES)}")
    rng = random.Random(seed + 1)
    brief = []
    for pair in pairs:
        if rng.random() < 0.5:
            verbose = rng.choice(_VERBOSE_TEMPLATES).format(answer=pair.chosen)
            pair = PreferencePair(image_id=pair.image_id, image_path=pair.image_path, prompt=pair.prompt,
                                  chosen=pair.chosen, rejected=verbose, kind=pair.kind)
        brief.append(pair)
    return brief


@dataclass(frozen=True)
class CalibrationBits:
    """What the silos answered: one row per (calibration question, objective), one bit column per silo."""

    features: torch.Tensor
    objective_ids: torch.Tensor
    bits: torch.Tensor
    silo_names: tuple[str, ...]
    objective_names: tuple[str, ...]
    flip_probabilities: list[float] | None
    records: int
    silo_accuracy: dict[str, dict[str, dict[str, float]]]  # objective -> silo -> kind -> share ranked right (debiased under RR)


def collect_bits(clients: Sequence[SiloClient], records: Sequence[VQARecord], features: RouterFeatures,
                 config: CalibrationConfig, *, progress: bool = False,
                 audit: AuditSink | None = None) -> CalibrationBits:
    """Ask every silo, once per objective, which calibration pairs it ranks right (no ledger charge: public pairs).

    Each objective is one round (one round id for all its requests), an entry in `audit` when given.
    """
    clients = list(clients)
    if not clients:
        raise ValueError("calibration needs at least one silo client")
    chosen = calibration_records(records, config)
    # Pairs are drawn over every kind's questions and the excluded kinds dropped after: make_pairs draws from one
    # sequential stream, so drawing over the kept kinds alone would give every later kind other pairs, and a
    # leave-one-silo-out router would differ from the full one in more than the held-out kind.
    every_kind = calibration_records(records, config.model_copy(update={"exclude_kinds": []}))
    rows_features = features.encode([r.image_path for r in chosen], [r.question for r in chosen], progress=progress)

    objective_blocks, bit_blocks = [], []
    silo_accuracy: dict[str, dict[str, dict[str, float]]] = {}
    for objective_id, objective in enumerate(config.objectives):
        pairs = [p for p in objective_pairs(every_kind, objective, seed=config.seed)
                 if p.kind not in config.exclude_kinds]
        requests = bits_requests(pairs, objective=objective, round_id=new_round_id(),
                                 randomized_response_epsilon=config.randomized_response_epsilon)
        answers, asked = [], []
        try:
            for client in clients:  # in turn; a refusal or absence stops calibration (it needs every silo)
                asked.append(client.name)
                answers.append(send_bits(client, requests))
        finally:  # on the record whether or not every silo answered
            if audit is not None:
                record_round(audit, stage="calibration", round_id=requests[0].round_id, objective=objective,
                             asked=asked, answered=asked[:len(answers)],
                             requests={name: requests for name in asked})
        bits = torch.stack(answers, dim=1)
        silo_accuracy[objective] = _accuracy_by_kind(bits, pairs, [c.name for c in clients],
                                                     epsilon=config.randomized_response_epsilon)
        objective_blocks.append(torch.full((len(pairs),), objective_id, dtype=torch.long))
        bit_blocks.append(bits)

    flips = None
    if config.randomized_response_epsilon is not None:
        from mor_secure.privacy.randomized_response import flip_probability

        flips = [flip_probability(epsilon=config.randomized_response_epsilon)] * len(clients)
    return CalibrationBits(features=rows_features.repeat(len(config.objectives), 1),
                           objective_ids=torch.cat(objective_blocks), bits=torch.cat(bit_blocks),
                           silo_names=tuple(c.name for c in clients), objective_names=tuple(config.objectives),
                           flip_probabilities=flips, records=len(chosen), silo_accuracy=silo_accuracy)


def fit_router(data: CalibrationBits, config: RouterConfig, *, progress: bool = False) -> CalibrationResult:
    """Train a router on bits already collected (several seeds need the silos to answer only once)."""
    router = train_router(data.features, data.objective_ids, data.bits, silo_names=data.silo_names,
                          objective_names=data.objective_names, config=config,
                          flip_probabilities=data.flip_probabilities, progress=progress)
    return CalibrationResult(router=router, records=data.records, silo_accuracy=data.silo_accuracy)


def calibrate_router(clients: Sequence[SiloClient], records: Sequence[VQARecord], features: RouterFeatures,
                     config: CalibrationConfig, *, progress: bool = False,
                     audit: AuditSink | None = None) -> CalibrationResult:
    """Ask every silo for its bits on every objective's pairs and train the router on them."""
    return fit_router(collect_bits(clients, records, features, config, progress=progress, audit=audit),
                      config.router, progress=progress)


def mean_weights_by_kind(router: Router, features: torch.Tensor, kinds: Sequence[str],
                         objective: str) -> dict[str, dict[str, float]]:
    """kind -> silo -> the router's mean weight on that kind's rows (how it routes, in one table)."""
    if features.shape[0] != len(kinds):
        raise ValueError(f"features has {features.shape[0]} rows for {len(kinds)} kinds; expected one each")
    objective_ids = torch.full((len(kinds),), router.objective_id(objective), dtype=torch.long)
    with torch.no_grad():
        weights = router.weights(features, objective_ids)
    table = {}
    for kind in sorted(set(kinds)):
        rows = torch.tensor([k == kind for k in kinds])
        table[kind] = {silo: round(weights[rows, i].mean().item(), 4) for i, silo in enumerate(router.silo_names)}
    return table


def _accuracy_by_kind(bits: torch.Tensor, pairs: Sequence[PreferencePair], silos: Sequence[str], *,
                      epsilon: float | None) -> dict[str, dict[str, float]]:
    """Per silo and kind, the share of pairs it ranked right; under randomized response (`epsilon`), the
    unbiased estimate of that share from the noisy bits (the raw share of noisy bits is pulled towards 0.5)."""
    kinds = [p.kind for p in pairs]
    table: dict[str, dict[str, float]] = {}
    for index, silo in enumerate(silos):
        table[silo] = {}
        for kind in sorted(set(kinds)):
            rows = torch.tensor([k == kind for k in kinds])
            column = bits[rows, index]
            share = column.float().mean().item() if epsilon is None else debiased_mean(column.bool(), epsilon=epsilon)
            table[silo][kind] = round(share, 4)
    return table
