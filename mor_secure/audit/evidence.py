"""From the parties' logs to what the reviewer's page shows: verify each, reconcile each silo, summarise.

Everything here is read from the logs themselves (and the consortium CA
certificate that says whose keys to trust): queries and refusals from each
silo's own entries, its privacy ledger's state as recorded with each call,
the router's weights (from the rounds of the MoR reward only: the other
methods' weights are fixed) and the scoring rounds from the coordinator's
round entries, each policy a silo served under and the served model's
privacy status from the silo's serving-start entries.

The logs are untrusted input: a party signs whatever its own software wrote.
Every value the page uses is checked for the type and range the log writes
(a time within 1970..9999, finite numbers, amounts of privacy budget >= 0,
router weights within 0..1, counts up to 2**53, lists of names), and an entry that is not in that shape
is counted, per party, as a finding of the page (`Shape`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509

from mor_secure.pki.identity import parse_identity

from .reconcile import QUERY_PREFIX, Reconciliation, UnloggedSilo, check_parties, reconcile, unlogged_silos
from .report_view import (
    LATEST_TIME,
    BudgetPoint,
    PartyCheck,
    PolicyInForce,
    ReconcileCheck,
    ReportView,
    RoundSummary,
    RouterWeight,
    ServedModel,
    ServingStart,
    SignedRoot,
    SiloQuery,
)
from .store import StoredLog
from .verify import Verification, verify_log

logger = logging.getLogger(__name__)
# The decisions a silo's transport writes (mor_secure.transport.authorization): "failed" is a handler's bug.
DECISIONS = ("admitted", "refused", "failed")
# A count the log writes (rows, charges) is at most 2**53, the last whole number a float holds exactly: a larger one
# (10**308, say) is not in the log's shape, and summing two would overflow the page's arithmetic.
MAX_COUNT = 2**53


@dataclass(frozen=True)
class Evidence:
    """The checks behind a report: one verification per log, one reconciliation per silo."""

    verifications: tuple[Verification, ...]
    reconciliations: tuple[Reconciliation, ...]
    unlogged: tuple[UnloggedSilo, ...]  # silos the coordinator called or asked whose log was not given


def _name(party: str) -> str:
    try:
        return parse_identity(party).name
    except ValueError:
        return party


def check_logs(coordinator: StoredLog, silos: Sequence[StoredLog], ca: x509.Certificate) -> Evidence:
    """`verify` every log with its CA-issued certificates, `reconcile` the coordinator's with each silo's, and name
    each silo the coordinator called or asked whose log is not among `silos`."""
    check_parties(coordinator, silos)
    verifications = tuple(verify_log(log, log.certificates_issued_by(ca)) for log in (coordinator, *silos))
    reconciliations = tuple(reconcile(coordinator, silo, ca) for silo in silos)
    return Evidence(verifications, reconciliations, tuple(unlogged_silos(coordinator, silos)))


def _party_check(log: StoredLog, verification: Verification, shape: Shape) -> PartyCheck:
    latest = None
    if verification.latest is not None:
        c = verification.latest
        latest = SignedRoot(party=log.party, size=c.size, root=c.root.hex(), time=c.time,
                            signature_ok=verification.latest_signature_ok)
    return PartyCheck(party=log.party, log_name=log.path.name, entries=verification.entries, ok=verification.ok,
                      problems=tuple(p.message for p in verification.problems),
                      unlisted_problems=verification.unlisted_problems, latest_root=latest,
                      uncovered_entries=verification.uncovered_entries, misshapen_entries=shape.misshapen,
                      left_out_entries=shape.left_out)


@dataclass
class Shape:
    """How one log's entries read: `misshapen` were not in the shape the log writes, `left_out` of them not shown.

    The counts a silo's entry holds, and its call's decision and status, are
    read tolerantly (a value that is not a count reads as 0, a decision or
    status the log never writes as its text or repr, and each marks the
    entry), so a silo cannot hide a refusal from the page by writing one
    field in another shape: a query is a refusal unless it is exactly
    "admitted" with status "OK" (`SiloQuery.refused`). Anything else not in
    the log's shape leaves the entry out. Either way the page says so.
    """

    misshapen: int = 0
    left_out: int = 0
    _odd: bool = field(default=False, init=False, repr=False)  # the entry being read had a field out of shape

    def count(self, value: Any) -> int:
        """A whole number in 0..MAX_COUNT as the log writes it (absent: 0); anything else reads as 0 and marks the
        entry."""
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT):
            return value or 0
        self._odd = True
        return 0

    def text(self, value: Any, allowed: tuple[str, ...] | None = None) -> str:
        """A string (one of `allowed`, if given) as the log writes it; a string not allowed reads as itself and
        anything else as its repr, and either marks the entry."""
        if isinstance(value, str) and (allowed is None or value in allowed):
            return value
        self._odd = True
        return value if isinstance(value, str) else repr(value)

    def read(self, log: StoredLog, read: Callable[[dict[str, Any]], None]) -> None:
        """`read` each entry's fields; an entry `read` cannot take (it raises) is left out."""
        for entry in log.entries:
            self._odd = False
            try:
                read(entry.fields())
            except (TypeError, ValueError, KeyError, AttributeError, OverflowError):
                self.left_out += 1
                self._odd = True
            self.misshapen += self._odd
        if self.left_out:
            logger.warning("%s: %d entries are not in the shape the log writes and are left out of the page; "
                           "run `mor audit verify` on it", log.path, self.left_out)


def _number(value: Any) -> float:
    """A finite JSON number (never a bool, a string or NaN), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return float(value)


def _spent(value: Any) -> float:
    """An amount of privacy budget (spent or a budget): a finite number >= 0, as a ledger keeps, else ValueError."""
    amount = _number(value)
    if amount < 0:
        raise ValueError(f"{value!r} is a negative amount of privacy budget")
    return amount


def _router_weight(value: Any) -> float:
    """A router's mean weight on a silo: in 0..1, as a convex mixture's weights are, else ValueError (a forged 1e300
    would set the scale of the page's shading, and every real weight would read as 0)."""
    weight = _number(value)
    if not 0 <= weight <= 1:
        raise ValueError(f"{value!r} is not a router weight (0 to 1)")
    return weight


def _time(fields: dict[str, Any]) -> float:
    """The entry's time: the log's clock writes seconds within the calendar, never NaN or 1e300."""
    when = _number(fields.get("time"))
    if not 0 <= when <= LATEST_TIME:
        raise ValueError(f"time {when!r} is outside 1970..9999")
    return when


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{value!r} is not a list of names")
    return tuple(value)


def _served_model(silo: str, when: float, stated: Any) -> ServedModel | None:
    """What a serving start says of its model (None: nothing, as a start logged before starts said it)."""
    if stated is None:
        return None
    if not (isinstance(stated, dict) and isinstance(stated.get("private"), bool)
            and isinstance(stated.get("why"), str) and isinstance(stated.get("unit"), str | None)):
        raise ValueError(f"model_privacy {stated!r} is not a private flag, a sentence and a unit")
    return ServedModel(silo=silo, time=when, private=stated["private"], why=stated["why"], unit=stated.get("unit"))


def _silo_rows(silo: StoredLog) -> tuple[list[SiloQuery], list[BudgetPoint], list[PolicyInForce],
                                         ServingStart | None, list[ServedModel], Shape]:
    name = _name(silo.party)
    queries, budgets, policies, starts, models, times = [], [], [], [], [], []
    last_budget = None
    shape = Shape()

    def read(fields: dict[str, Any]) -> None:
        nonlocal last_budget
        event, when = fields.get("event"), _time(fields)
        privacy = fields.get("privacy") or {}
        ledger = privacy.get("ledger") if event == "call" else fields.get("ledger")
        query = policy = state = model = None
        if event == "call" and str(fields.get("rpc", "")).startswith(QUERY_PREFIX):
            spent = privacy.get("epsilon_spent")
            query = SiloQuery(silo=name, time=when, caller=str(fields.get("caller")),
                              rpc=str(fields["rpc"]).removeprefix(QUERY_PREFIX),
                              objective=str(fields.get("objective") or ""),
                              decision=shape.text(fields.get("decision"), DECISIONS),
                              status=shape.text(fields.get("status")),
                              reason=str(fields.get("reason") or ""), items=shape.count(fields.get("items")),
                              epsilon_spent=0.0 if spent is None else _spent(spent))
        elif event == "serving_started":
            policy = PolicyInForce(silo=name, digest=str(fields.get("policy_digest")),
                                   text=str(fields.get("policy_text")), time=when)
            model = _served_model(name, when, fields.get("model_privacy"))
        if ledger:
            state = {key: _spent(ledger[key]) for key in ("epsilon_spent", "epsilon_budget", "delta_spent",
                                                          "delta_budget")}
            state |= {key: shape.count(ledger.get(key)) for key in ("charges", "open_reservations")}
        # Everything read: only now does the entry count (never half of one).
        queries.extend([query] if query else [])
        policies.extend([policy] if policy else [])
        starts.extend([when] if policy else [])
        models.extend([model] if model else [])
        if state is not None and state != last_budget:  # the ledger changes only with training: one point each
            budgets.append(BudgetPoint(silo=name, time=when, **state))
            last_budget = state
        times.append(when)

    shape.read(silo, read)
    # Each policy from the start that put it in force: a restart under the policy already in force changes nothing.
    changes = [p for before, p in zip([None, *policies], policies) if before is None or p.digest != before.digest]
    started = ServingStart(silo=name, time=min(starts)) if starts else None
    if budgets and times:
        final = budgets[-1]
        end = times[-1]
        if end > final.time:  # carry the last known state to the end of the log, for the plot
            budgets.append(replace(final, time=end))
    return queries, budgets, changes, started, models, shape


def _coordinator_rows(coordinator: StoredLog) -> tuple[list[RoundSummary], list[RouterWeight], Shape]:
    rounds = []
    totals: dict[tuple[str, str], list[float]] = {}
    shape = Shape()

    def read(fields: dict[str, Any]) -> None:
        if fields.get("event") != "round":
            return
        summary = RoundSummary(time=_time(fields), round_id=str(fields.get("round_id")),
                               objective=str(fields.get("objective")), asked=_strings(fields.get("asked", [])),
                               answered=_strings(fields.get("answered", [])), items=shape.count(fields.get("items")))
        weights = []
        if fields.get("method") == "mor":  # the router's weights only mean something in the router-fused reward
            weights = [(str(silo), str(kind), _router_weight(mean), shape.count(count))
                       for silo, by_kind in (fields.get("mean_weight") or {}).items()
                       for kind, (mean, count) in by_kind.items()]
        rounds.append(summary)  # only once the whole entry has been read
        for silo, kind, mean, count in weights:
            total = totals.setdefault((silo, kind), [0.0, 0])
            total[0] += mean * count
            total[1] += count

    shape.read(coordinator, read)
    weights = [RouterWeight(silo=silo, question_kind=kind, mean_weight=total / count, items=int(count))
               for (silo, kind), (total, count) in sorted(totals.items()) if count]
    return rounds, weights, shape


def report_view(coordinator: StoredLog, silos: Sequence[StoredLog], evidence: Evidence, *,
                title: str = "Consortium audit report") -> ReportView:
    """The page's contents (mor_secure.audit.report renders them)."""
    logs = (coordinator, *silos)
    queries, budgets, policies, starts, models = [], [], [], [], []
    rounds, weights, coordinator_shape = _coordinator_rows(coordinator)
    shapes = [coordinator_shape]
    for silo in silos:
        silo_queries, silo_budgets, silo_policies, started, silo_models, shape = _silo_rows(silo)
        queries += silo_queries
        models += silo_models
        budgets += silo_budgets
        shapes.append(shape)
        policies += silo_policies
        starts += [started] if started is not None else []
    return ReportView(
        title=title, generated_at=time.time(),
        parties=tuple(_party_check(log, v, shape)
                      for log, v, shape in zip(logs, evidence.verifications, shapes, strict=True)),
        reconciliation=tuple(ReconcileCheck(silo=_name(r.silo), ok=r.ok, queries_matched=r.matched,
                                            checkpoints_checked=r.checkpoints_checked,
                                            mismatches=tuple(r.mismatches),
                                            unlisted_mismatches=r.unlisted_mismatches)
                      for r in evidence.reconciliations),
        queries=tuple(queries), budgets=tuple(budgets), router_weights=tuple(weights), rounds=tuple(rounds),
        policies=tuple(policies), unlogged=evidence.unlogged, serving_started=tuple(starts),
        served_models=tuple(models))
