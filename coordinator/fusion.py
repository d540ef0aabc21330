"""Fusion: from router weights w [N, K] and the items to score, the fused reward R = sum_k w_k r_k [N].

GRPO's reward code calls a `Fusion` and nothing else about the silos, so how
the sum is formed can change without touching it. `ClearFusion` runs the
protocol of secure aggregation (DESIGN §4) without its masks and encryption:
each silo is sent only its own weights w_k per row and answers its weighted
terms w_k r_k, which the coordinator adds in the clear. The coordinator then
sees each silo's terms (and, knowing w_k, its scores), which is acceptable for
tests, benchmarks and single-machine simulations only; secure aggregation,
in which the coordinator learns only the sum, implements the same interface.

Silos are asked in parallel, so a round takes as long as the slowest silo,
not the sum. A silo that does not answer (UNAVAILABLE or DEADLINE_EXCEEDED
after its client's retries) is left out of the round when at least
`minimum_participants` silos answered: the sum of the others' terms is
divided by their total weight per item (their weights renormalised), and an
item with (almost) all its weight on absent silos (`MIN_PRESENT_WEIGHT`) is
asked again, in a second round, with equal weights for the present ones (`SecureFusion` sends them
within its restarted round instead: see there); `last_round` says who
answered, and the reward logs it with GRPO's metrics. It is asked again next round, so a silo that
comes back rejoins. With fewer answers than the minimum the round fails
with an error naming the missing silos. Any other refusal (a policy limit,
bad input) fails the round at once: it is an answer, not an absence.

Every round has a fresh round id that all its requests carry; with `audit=`
(the coordinator's log) each round is an entry too, failed ones included
(coordinator/audit_trail.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import torch

from mor_secure.cli_errors import RoundFailedError
from mor_secure.transport.authorization import AuditSink
from mor_secure.wire.client import SiloClient
from mor_secure.wire.errors import ErrorCode, SiloError
from mor_secure.wire.messages import ScoreRequest

from .audit_trail import new_round_id, record_round
from .silo_requests import send_scores, score_requests


logger = logging.getLogger(__name__)
T = TypeVar("T")
# Statuses that mean "this silo is absent", not "this silo refused".
ABSENT = (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED)
# Least total weight of a row's present silos that is renormalised; below it the row gets their plain average.
# Secure aggregation rounds each term to 2^-20 (mor_secure/secagg/fixed_point.py): over its 16 silos at most,
# the sum errs by 16 * 2^-21 = 2^-17, which dividing by a weight of at least 2^-7 keeps within 2^-10 (~1e-3,
# a thousandth of a standardised score's spread).
MIN_PRESENT_WEIGHT = 2.0**-7


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
    """Each silo weights its scores of every distinct row (in parallel); the sum is formed here, in the clear.

    A group of `num_generations` one-word answers repeats itself (8 samples
    are often 2 or 3 distinct answers), so only distinct (image, prompt,
    response) rows are sent: the silos score, and are queried about, less.
    `minimum_participants` (default: all) is how many silos must answer.
    `objective` is the reward objective every request names (the silos'
    policies may refuse some; mor_secure.wire.messages.OBJECTIVES);
    `method` (e.g. "mor", "uniform") labels the rounds in the audit log.
    """

    def __init__(self, clients: Sequence[SiloClient], *, objective: str = "correct",
                 minimum_participants: int | None = None, audit: AuditSink | None = None, method: str = "") -> None:
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
        self.method = method
        self.audit = audit
        self.minimum_participants = minimum
        self.last_round: dict[str, bool] = {}

    @property
    def silo_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.clients)

    @staticmethod
    def _in_parallel(clients: Sequence[SiloClient], call: Callable[[SiloClient], T]) -> dict[str, T | Exception]:
        """`call(client)` for every client at once: each silo's answer, or its error (absent, refusing, an answer
        that does not check out, or a bug).

        Errors are returned too, so the round can be recorded with who did
        answer before `raise_refusal` fails it (a silo cannot keep a round
        off the record by answering malformed).
        """
        def ask(client: SiloClient) -> T | Exception:
            try:
                return call(client)
            except Exception as error:  # noqa: BLE001 - returned, and raised once the round is on record
                return error
        if len(clients) == 1:
            return {clients[0].name: ask(clients[0])}
        with ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="fusion") as pool:
            answers = list(pool.map(ask, clients))
        return {client.name: answer for client, answer in zip(clients, answers, strict=True)}

    def _round(self, clients: Sequence[SiloClient], rows: tuple[list, list, list], weights: torch.Tensor,
               kinds: Sequence[str] | None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """One scoring round over `clients` (fresh round id, on the record): who answered, their summed terms, and
        the weights they were sent (here `weights`)."""
        round_id = new_round_id()
        # Read, hash and pack the images once per round; each silo's copy differs only in its weights.
        shared = score_requests(*rows, objective=self.objective, round_id=round_id)
        column = {c.name: k for k, c in enumerate(self.clients)}
        requests = {c.name: weighted(shared, weights[:, column[c.name]]) for c in clients}  # its own weights only
        answers = self._in_parallel(clients, lambda c: send_scores(c, requests[c.name]))
        present = [name for name, answer in answers.items() if not isinstance(answer, Exception)]
        self._on_record(round_id, list(answers), present, requests, weights,
                        self._router_scored(answers, present, weights, kinds))  # a refused round too
        raise_refusal(answers)
        self._check_minimum(answers, present)
        return present, sum(answers[name] for name in present), weights

    def _router_scored(self, answers: dict[str, object], present: Sequence[str], weights: torch.Tensor,
                       kinds: Sequence[str] | None) -> list[str | None] | None:
        """The kinds of the round's rows whose reward the router's weights formed (None for the others), or None
        if none did: the rows the report's mean router weight counts.

        A round that fails the reward (a refusal, too few answers) forms none;
        an orphan row's reward is the plain average of the present silos.
        """
        if kinds is None or len(present) < self.minimum_participants or any(map(is_refusal, answers.values())):
            return None
        _, orphans = equal_weights_for_orphans(weights, torch.tensor([c.name in present for c in self.clients]))
        return without_orphans(kinds, orphans)

    def _on_record(self, round_id: str, asked: Sequence[str], present: Sequence[str], requests: dict,
                   weights: torch.Tensor, kinds: Sequence[str] | None) -> None:
        if self.audit is not None:
            record_round(self.audit, stage="reward", round_id=round_id, objective=self.objective,
                         asked=asked, answered=list(present), requests=requests, weights=weights,
                         columns=self.silo_names, kinds=kinds, method=self.method)

    def _check_minimum(self, answers: dict[str, object], present: Sequence[str]) -> None:
        missing = [name for name in answers if name not in present]
        if len(present) < self.minimum_participants:
            reasons = "; ".join(str(answers[name]) for name in missing)
            raise RoundFailedError(f"only {len(present)} of {len(self.clients)} silos answered, fewer than the "
                                   f"consortium's minimum of {self.minimum_participants}: {reasons}")
        if missing:
            logger.warning("scoring round without %s (unavailable); the other silos' weights are renormalised",
                           ", ".join(missing))

    def fuse(self, items: FusionItems, weights: torch.Tensor) -> torch.Tensor:
        """R = sum over answering silos of w_k r_k / sum of their w_k, per row (see `renormalised`)."""
        if tuple(weights.shape) != (len(items), len(self.clients)):
            raise ValueError(f"weights have shape {tuple(weights.shape)}, expected {(len(items), len(self.clients))}")
        rows = list(zip(items.images, items.prompts, items.responses, strict=True))
        first: dict[tuple, int] = {}
        for i, row in enumerate(rows):
            first.setdefault(row, i)
        distinct = list(first)
        position = {row: i for i, row in enumerate(distinct)}
        index = torch.tensor([position[row] for row in rows], dtype=torch.long)
        columns = tuple(list(column) for column in zip(*distinct, strict=True))
        distinct_weights = weights[list(first.values())].detach().float().cpu()  # a row's weights depend on it alone
        kinds = None if items.kinds is None else [items.kinds[i] for i in first.values()]
        answered, summed, sent = self._round(self.clients, columns, distinct_weights, kinds)
        self.last_round = {c.name: c.name in answered for c in self.clients}
        present = torch.tensor([self.last_round[c.name] for c in self.clients])
        fused, orphans = renormalised(summed, sent, present)
        if orphans.any():
            fused[orphans] = self._uniform_over(answered, columns, orphans)
        return fused[index]

    def _uniform_over(self, answered: Sequence[str], columns: tuple[list, list, list],
                      orphans: torch.Tensor) -> torch.Tensor:
        """Rows whose whole weight was on absent silos: the plain average of the present silos, in a new round."""
        chosen = orphans.nonzero().flatten().tolist()
        clients = [c for c in self.clients if c.name in answered]
        uniform = torch.zeros(len(chosen), len(self.clients))
        for k, client in enumerate(self.clients):
            if client.name in answered:
                uniform[:, k] = 1.0 / len(clients)
        rows = tuple([column[i] for i in chosen] for column in columns)
        # No question kinds on this round's record: its weights are this fallback's, not the router's, and the
        # report's mean router weight per silo and kind must not count them.
        again, summed, _ = self._round(clients, rows, uniform, None)
        return summed * (len(clients) / len(again))


def is_refusal(answer: object) -> bool:
    """Whether a silo's answer is an error that is not an absence: a refusal, a malformed answer, a bug."""
    return isinstance(answer, Exception) and not (isinstance(answer, SiloError) and answer.code in ABSENT)


def raise_refusal(answers: dict[str, object]) -> None:
    """Raise the first refusal among `answers` (`is_refusal`: the round fails at once; an exception keeps its
    traceback)."""
    for answer in answers.values():
        if is_refusal(answer):
            raise answer


def weighted(requests: Sequence[ScoreRequest], weights: torch.Tensor) -> list[ScoreRequest]:
    """The same requests carrying one silo's weight per row ([D] over all requests' rows, in order)."""
    out, start = [], 0
    for request in requests:
        end = start + len(request.rows)
        out.append(replace(request, weights=tuple(weights[start:end].tolist())))
        start = end
    return out


def equal_weights_for_orphans(weights: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weights` [N, K] with every row that `renormalised` would call an orphan given equal weights for the
    `present` silos (0 for the others); and which rows those are."""
    orphans = weights[:, present].sum(dim=1) < MIN_PRESENT_WEIGHT
    equal = torch.where(present, 1.0 / int(present.sum()), 0.0).to(weights.dtype)
    return torch.where(orphans[:, None], equal, weights), orphans


def without_orphans(kinds: Sequence[str | None] | None, orphans: torch.Tensor) -> list[str | None] | None:
    """`kinds` with None for the orphan rows: their reward is the present silos' plain average, not the router's, so
    the round's mean router weight per kind leaves them out."""
    return None if kinds is None else [None if orphan else kind for kind, orphan in zip(kinds, orphans.tolist(),
                                                                                        strict=True)]


def renormalised(summed: torch.Tensor, weights: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the present silos' summed terms divided by their total weight; and the rows with none.

    Dividing by the present silos' weight is the fused reward under their
    weights rescaled to sum to 1 (all present: the sum is 1). A row whose
    present silos hold less than `MIN_PRESENT_WEIGHT` has nothing worth
    rescaling (the router all but ruled them out): it is returned as an
    orphan, for the plain average of the present silos.
    """
    total = weights[:, present].sum(dim=1)
    orphans = total < MIN_PRESENT_WEIGHT
    return torch.where(orphans, torch.zeros_like(total), summed / torch.where(orphans, 1.0, total)), orphans


def as_fusion(silos: Fusion | Sequence[SiloClient]) -> Fusion:
    """A `Fusion` as is; a list of clients as their `ClearFusion` (tests and in-process simulations)."""
    if isinstance(silos, Fusion):
        return silos
    return ClearFusion(silos)
