"""What the compliance report shows, as plain data: built from the parties' logs, rendered to one HTML page.

`evidence.py` reads and checks the logs and fills these; `report.py` turns
them into a page. Nothing here holds raw data: queries are counted, never
shown; roots and digests are hex.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from mor_secure.privacy.ledger_chain import BUDGET_RTOL

from .reconcile import SILO_PREFIX, UnloggedSilo

# 9999-12-31T23:59:59Z, the last second a calendar date (datetime) holds: an entry dated later, before 1970, or
# at NaN was not dated by the log's clock.
LATEST_TIME = 253_402_300_799.0


def utc_text(seconds: float, *, iso: bool = False) -> str:
    """`seconds` since the epoch in UTC; a time no calendar holds (a forged checkpoint's, say) as the number itself."""
    try:
        moment = datetime.fromtimestamp(seconds, timezone.utc)
    except (OverflowError, OSError, ValueError, TypeError):
        return f"{seconds!r} (not a valid time)"
    if iso:
        return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def page_text(value: object) -> str:
    """`value` as text the page can hold: a lone surrogate (canonical JSON takes "\\ud800", UTF-8 cannot encode it,
    and matplotlib cannot draw it) as its escape, so the page shows what the log holds and is still written."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def number_text(x: float) -> str:
    """A ledger figure (finite: evidence refuses others) as the page writes it: two decimals, a forged 1.7e308 as a
    number (not 309 digits)."""
    return f"{x:.2f}" if abs(x) < 1e6 else f"{x:.3g}"


def plural(n: int, word: str) -> str:
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}{'es' if word.endswith('ch') else 's'}"


def silo_name(party: str) -> str | None:
    """`hospital-a` for `mor://silo/hospital-a`; None for a party that is not a silo."""
    return party[len(SILO_PREFIX):] if party.startswith(SILO_PREFIX) else None


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
    unlisted_problems: int = 0  # found beyond those `problems` lists
    # The newest entries no signed checkpoint covers yet (up to a checkpoint interval while the party runs).
    uncovered_entries: int = 0
    # Entries not in the shape the log writes (a field of the wrong type, a time no calendar holds), and how many
    # of them could not be shown at all; verify cannot see this (the party may have signed them itself).
    misshapen_entries: int = 0
    left_out_entries: int = 0


@dataclass(frozen=True)
class ReconcileCheck:
    """`mor audit reconcile` between the coordinator's log and one silo's log."""

    silo: str
    ok: bool
    queries_matched: int
    checkpoints_checked: int
    mismatches: tuple[str, ...]
    unlisted_mismatches: int = 0  # found beyond those `mismatches` lists


@dataclass(frozen=True)
class SiloQuery:
    """One call a silo answered or refused, as its own log records it."""

    silo: str
    time: float
    caller: str
    rpc: str
    objective: str
    decision: str  # "admitted", "refused" or "failed" (a bug on the silo's side), as the log writes it
    status: str
    reason: str
    items: int
    epsilon_spent: float

    @property
    def refused(self) -> bool:
        """Not answered with scores: only an admitted call that ended OK was, whatever else the entry says."""
        return self.decision != "admitted" or self.status != "OK"


@dataclass(frozen=True)
class BudgetPoint:
    """A silo's privacy ledger at `time`: spent so far against its lifetime budget."""

    silo: str
    time: float
    epsilon_spent: float
    epsilon_budget: float
    delta_spent: float
    delta_budget: float
    charges: int = 0  # the ledger's reservations, settled or not (0 where the log does not say)
    open_reservations: int = 0  # of them, those not settled yet

    @property
    def overspent(self) -> bool:
        """Spent more than the budget allows: a ledger refuses any charge beyond it (beyond its rounding slack,
        `BUDGET_RTOL`: 0.1 + 0.2 of a budget of 0.3 is 0.30000000000000004, within it), so this one was not kept
        as one."""
        slack = 1 + BUDGET_RTOL
        return self.epsilon_spent > self.epsilon_budget * slack or self.delta_spent > self.delta_budget * slack

    def fell_unexplained(self, before: "BudgetPoint") -> bool:
        """Whether the ledger went from `before` to this in a way no ledger can: a charge removed, or its spent
        total lower with no reservation settled (settling for less than was reserved is a ledger's only fall)."""
        fell = self.epsilon_spent < before.epsilon_spent or self.delta_spent < before.delta_spent
        return self.charges < before.charges or (fell and self.open_reservations >= before.open_reservations)


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
    """A serving policy a silo recorded when it started (its digest and its text), from `time` on (None: the view
    does not say when)."""

    silo: str
    digest: str
    text: str
    time: float | None = None


@dataclass(frozen=True)
class ServingStart:
    """The first time a silo's log records it starting to serve (its first serving-start entry)."""

    silo: str
    time: float


@dataclass(frozen=True)
class ServedModel:
    """What one serving-start entry of a silo says of the model it served: differentially private or not, and why
    (the sentence as the silo logged it, from the model's privacy report)."""

    silo: str
    time: float
    private: bool
    why: str
    unit: str | None = None  # what one unit of a private model's epsilon is; None: the start does not say


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
    unlogged: tuple[UnloggedSilo, ...] = ()  # silos the coordinator called or asked whose log was not given
    serving_started: tuple[ServingStart, ...] = ()
    # One per serving-start entry that states its model's privacy (a silo's log from before they did has none).
    served_models: tuple[ServedModel, ...] = ()

    def models_served(self, silo: str) -> tuple[ServedModel, ...]:
        """What `silo`'s serving starts say of the models it served, oldest first (empty: its log does not say)."""
        return tuple(sorted((m for m in self.served_models if m.silo == silo), key=lambda m: m.time))

    @property
    def coordinator(self) -> str | None:
        """The coordinator's party: the one party whose log was given that is not a silo."""
        return next((p.party for p in self.parties if silo_name(p.party) is None), None)

    def unverified_silos(self) -> frozenset[str]:
        """The silos whose own log failed verification: nothing the page reads from it is vouched for."""
        return frozenset(silo for p in self.parties if not p.ok and (silo := silo_name(p.party)) is not None)

    def serving_since(self, silo: str) -> float | None:
        """When `silo` began serving: its first serving start, or its first query of any kind if that is earlier
        (or the log records no start); None if neither is on record."""
        times = [s.time for s in self.serving_started if s.silo == silo]
        times += [q.time for q in self.queries if q.silo == silo]
        return min(times, default=None)

    def failures(self) -> list[str]:
        """What stops the record reading INTACT, one phrase each (empty: intact): the page's verdict and the exit
        status of `mor audit report` both come from here."""
        out = [] if self.parties else ["no party's log was verified"]
        reconciled = {r.silo for r in self.reconciliation}
        for p in self.parties:
            if not p.ok:
                out.append(f"verification of {p.party} ({plural(len(p.problems) + p.unlisted_problems, 'problem')})")
            if p.latest_root is not None and not p.latest_root.signature_ok:
                out.append(f"signature on the latest root of {p.party}")
            if (silo := silo_name(p.party)) is not None and silo not in reconciled:
                out.append(f"no reconciliation of {silo} with the coordinator")
            if p.misshapen_entries:
                out.append(f"{plural(p.misshapen_entries, 'entry')} of {p.party} "
                           f"{'is' if p.misshapen_entries == 1 else 'are'} not in the shape the log writes "
                           f"({p.left_out_entries} left out of the page)")
        out += [f"reconciliation of {r.silo} with the coordinator "
                f"({plural(len(r.mismatches) + r.unlisted_mismatches, 'mismatch')})"
                for r in self.reconciliation if not r.ok]
        out += [f"no log given of {u.silo} (the coordinator called it {plural(u.calls, 'time')} and asked it in "
                f"{plural(u.rounds, 'round')})" for u in self.unlogged]
        return out
