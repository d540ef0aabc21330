"""Fusion: from router weights w [N, K] and the items to score, the fused reward R = sum_k w_k r_k [N].

GRPO's reward code calls a `Fusion` and nothing else about the silos, so how
the sum is formed can change without touching it. `ClearFusion` asks every
silo for its scores and adds them on the coordinator: the coordinator then
sees each silo's scores, which is acceptable for tests, benchmarks and
single-machine simulations only. Secure aggregation (DESIGN §4), in which each
silo receives only its own weights and the coordinator learns only the sum,
implements the same interface.

Silos are asked in parallel, so a round takes as long as the slowest silo,
not the sum. A silo that does not answer (UNAVAILABLE or DEADLINE_EXCEEDED
after its client's retries) is left out of the round when at least
`minimum_participants` silos answered: its weight becomes 0 and the others'
are renormalised per item; `last_round` says who answered, and the reward
logs it with GRPO's metrics. It is asked again next round, so a silo that
comes back rejoins. With fewer answers than the minimum the round fails
with an error naming the missing silos. Any other refusal (a policy limit,
bad input) fails the round at once: it is an answer, not an absence.

Every round has a fresh round id that all its requests carry; with `audit=`
(the coordinator's log) each round is an entry too, failed ones included
(coordinator/audit_trail.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from mor_secure.transport.authorization import AuditSink
from mor_secure.wire.client import SiloClient
from mor_secure.wire.errors import ErrorCode, SiloError

from .audit_trail import new_round_id, record_round
from .router import fused_reward
from .silo_requests import send_scores, score_requests


logger = logging.getLogger(__name__)
# Statuses that mean "this silo is absent", not "this silo refused".
ABSENT = (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED)


class RoundFailedError(RuntimeError):
    """Too few silos answered a scoring round for the consortium's minimum participants."""


@dataclass(frozen=True)
class FusionItems:
    """The rows to score: image file (the coordinator's public copy), prompt and response per row.

    `kinds` (the question kind per row, optional) only labels the round's
    audit entry: the router's mean weight per silo and kind.
    """

    images: tuple[str | Path, ...]
    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    kinds: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kinds is not None and len(self.kinds) != len(self.responses):
            raise ValueError(f"kinds has {len(self.kinds)} entries for {len(self.responses)} rows")
        if not (len(self.images) == len(self.prompts) == len(self.responses)):
            raise ValueError(f"images, prompts and responses must have one entry per row, got lengths "
                             f"{len(self.images)}, {len(self.prompts)}, {len(self.responses)}")

    def __len__(self) -> int:
        return len(self.responses)


@runtime_checkable
class Fusion(Protocol):
    """Forms R = sum_k w_k r_k over a fixed, ordered set of silos."""

    @property
    def silo_names(self) -> tuple[str, ...]:
        """The silos, in the column order of `weights`."""
        ...

    @property
    def last_round(self) -> dict[str, bool]:
        """Silo name -> whether it answered the latest `fuse` (empty before the first)."""
        ...

    def fuse(self, items: FusionItems, weights: torch.Tensor) -> torch.Tensor:
        """[N] fused rewards for N items, given [N, K] weights (rows sum to 1)."""
        ...


class ClearFusion:
    """Each silo scores every distinct row once (in parallel); the weighted sum is formed here, in the clear.

    A group of `num_generations` one-word answers repeats itself (8 samples
    are often 2 or 3 distinct answers), so only distinct (image, prompt,
    response) rows are sent: the silos score, and are queried about, less.
    `minimum_participants` (default: all) is how many silos must answer.
    `objective` is the reward objective every request names (the silos'
    policies may refuse some; mor_secure.wire.messages.OBJECTIVES).
    """

    def __init__(self, clients: Sequence[SiloClient], *, objective: str = "correct",
                 minimum_participants: int | None = None, audit: AuditSink | None = None) -> None:
        clients = list(clients)
        if not clients:
            raise ValueError("fusion needs at least one silo client")
        for index, client in enumerate(clients):
            if not isinstance(client, SiloClient):
                raise ValueError(f"clients[{index}] is a {type(client).__name__}, expected a SiloClient "
                                 "(name, describe, score, correctness_bits)")
        names = [c.name for c in clients]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"each silo may appear once; repeated: {repeated}")
        minimum = len(clients) if minimum_participants is None else min(minimum_participants, len(clients))
        if minimum < 1:
            raise ValueError(f"minimum_participants must be at least 1, got {minimum_participants}")
        self.clients = clients
        self.objective = objective
        self.audit = audit
        self.minimum_participants = minimum
        self.last_round: dict[str, bool] = {}

    @property
    def silo_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.clients)

    def _ask_all(self, requests: list) -> dict[str, torch.Tensor | SiloError]:
        def ask(client: SiloClient) -> torch.Tensor | SiloError:
            try:
                return send_scores(client, requests)
            except SiloError as error:
                if error.code in ABSENT:
                    return error
                raise
        if len(self.clients) == 1:
            return {self.clients[0].name: ask(self.clients[0])}
        with ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="fusion") as pool:
            answers = list(pool.map(ask, self.clients))
        return {client.name: answer for client, answer in zip(self.clients, answers, strict=True)}

    def fuse(self, items: FusionItems, weights: torch.Tensor) -> torch.Tensor:
        if tuple(weights.shape) != (len(items), len(self.clients)):
            raise ValueError(f"weights have shape {tuple(weights.shape)}, expected {(len(items), len(self.clients))}")
        rows = list(zip(items.images, items.prompts, items.responses, strict=True))
        distinct = list(dict.fromkeys(rows))
        position = {row: i for i, row in enumerate(distinct)}
        index = torch.tensor([position[row] for row in rows], dtype=torch.long)
        images, prompts, responses = (list(column) for column in zip(*distinct, strict=True))
        round_id = new_round_id()
        # Read, hash and pack the images once per round; every silo gets the same requests.
        requests = score_requests(images, prompts, responses, objective=self.objective, round_id=round_id)
        answers = self._ask_all(requests)
        self.last_round = {name: not isinstance(answer, SiloError) for name, answer in answers.items()}
        missing = [name for name, answered in self.last_round.items() if not answered]
        if self.audit is not None:
            record_round(self.audit, stage="reward", round_id=round_id, objective=self.objective,
                         asked=self.silo_names, answered=[n for n, a in self.last_round.items() if a],
                         requests=requests, weights=weights, kinds=items.kinds)
        if len(self.clients) - len(missing) < self.minimum_participants:
            reasons = "; ".join(str(answers[name]) for name in missing)
            raise RoundFailedError(f"only {len(self.clients) - len(missing)} of {len(self.clients)} silos answered, "
                                   f"fewer than the consortium's minimum of {self.minimum_participants}: {reasons}")
        if missing:
            logger.warning("scoring round without %s (unavailable); the other silos' weights are renormalised",
                           ", ".join(missing))
        present = torch.tensor([self.last_round[c.name] for c in self.clients], dtype=weights.dtype)
        scores = torch.stack([answers[c.name] if self.last_round[c.name] else torch.zeros(len(distinct))
                              for c in self.clients], dim=1)
        effective = renormalised(weights, present)
        return fused_reward(effective, scores[index])


def renormalised(weights: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[N, K] weights with absent silos' columns zeroed and each row rescaled to sum to 1.

    A row whose whole weight was on absent silos falls back to the plain
    average of the present ones: the router had no opinion among them.
    """
    kept = weights * present
    totals = kept.sum(dim=1, keepdim=True)
    uniform = present.expand_as(weights) / present.sum()
    return torch.where(totals > 0, kept / totals.clamp(min=1e-12), uniform)


def as_fusion(silos: Fusion | Sequence[SiloClient]) -> Fusion:
    """A `Fusion` as is; a list of clients as their `ClearFusion` (tests and in-process simulations)."""
    if isinstance(silos, Fusion):
        return silos
    return ClearFusion(silos)
