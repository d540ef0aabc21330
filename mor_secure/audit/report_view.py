"""What the compliance report shows, as plain data: built from the parties' logs, rendered to one HTML page.

`evidence.py` reads and checks the logs and fills these; `report.py` turns
them into a page. Nothing here holds raw data: queries are counted, never
shown; roots and digests are hex.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone


def utc_text(seconds: float, *, iso: bool = False) -> str:
    """`seconds` since the epoch in UTC; a time no calendar holds (a forged checkpoint's, say) as the number itself."""
    try:
        moment = datetime.fromtimestamp(seconds, timezone.utc)
    except (OverflowError, OSError, ValueError, TypeError):
        return f"{seconds!r} (not a valid time)"
    if iso:
        return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class SignedRoot:
    """A party's checkpoint: the Merkle root of its first `size` entries, signed at `time`."""

    party: str
    size: int
    root: str
    time: float
    signature_ok: bool


@dataclass(frozen=True)
class PartyCheck:
    """`mor audit verify` on one party's log."""

    party: str
    log_name: str
    entries: int
    ok: bool
    problems: tuple[str, ...]
    latest_root: SignedRoot | None


@dataclass(frozen=True)
class ReconcileCheck:
    """`mor audit reconcile` between the coordinator's log and one silo's log."""

    silo: str
    ok: bool
    queries_matched: int
    checkpoints_checked: int
    mismatches: tuple[str, ...]


@dataclass(frozen=True)
class SiloQuery:
    """One call a silo answered or refused, as its own log records it."""

    silo: str
    time: float
    caller: str
    rpc: str
    objective: str
    decision: str  # "admitted" or "refused"
    status: str
    reason: str
    items: int
    epsilon_spent: float


@dataclass(frozen=True)
class BudgetPoint:
    """A silo's privacy ledger at `time`: spent so far against its lifetime budget."""

    silo: str
    time: float
    epsilon_spent: float
    epsilon_budget: float
    delta_spent: float
    delta_budget: float


@dataclass(frozen=True)
class RouterWeight:
    """The router's mean weight on `silo` over `items` scored rows of one question kind."""

    silo: str
    question_kind: str
    mean_weight: float
    items: int


@dataclass(frozen=True)
class RoundSummary:
    """One scoring round of the coordinator: who was asked, who answered."""

    time: float
    round_id: str
    objective: str
    asked: tuple[str, ...]
    answered: tuple[str, ...]
    items: int


@dataclass(frozen=True)
class PolicyInForce:
    """The serving policy a silo recorded when it started (its digest and its text)."""

    silo: str
    digest: str
    text: str


@dataclass(frozen=True)
class ReportView:
    """Everything on the reviewer's page."""

    title: str
    generated_at: float
    parties: tuple[PartyCheck, ...]
    reconciliation: tuple[ReconcileCheck, ...]
    queries: tuple[SiloQuery, ...]
    budgets: tuple[BudgetPoint, ...]
    router_weights: tuple[RouterWeight, ...]
    rounds: tuple[RoundSummary, ...]
    policies: tuple[PolicyInForce, ...]
