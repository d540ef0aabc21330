"""From the parties' logs to what the reviewer's page shows: verify each, reconcile each silo, summarise.

Everything here is read from the logs themselves (and the consortium CA
certificate that says whose keys to trust): queries and refusals from each
silo's own entries, its privacy ledger's state as recorded with each call,
the router's weights (from the rounds of the MoR reward only: the other
methods' weights are fixed) and the scoring rounds from the coordinator's
round entries, the policy in force from the silo's serving-start entry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from mor_secure.pki.identity import parse_identity

from .log import StoredLog
from .reconcile import QUERY_PREFIX, Reconciliation, check_parties, reconcile, trusted_certificates
from .report_view import (
    BudgetPoint,
    PartyCheck,
    PolicyInForce,
    ReconcileCheck,
    ReportView,
    RoundSummary,
    RouterWeight,
    SignedRoot,
    SiloQuery,
)
from .verify import Verification, verify_log

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evidence:
    """The checks behind a report: one verification per log, one reconciliation per silo."""

    verifications: tuple[Verification, ...]
    reconciliations: tuple[Reconciliation, ...]

    @property
    def intact(self) -> bool:
        return all(v.ok for v in self.verifications) and all(r.ok for r in self.reconciliations)


def _name(party: str) -> str:
    try:
        return parse_identity(party).name
    except ValueError:
        return party


def check_logs(coordinator: StoredLog, silos: Sequence[StoredLog], ca: x509.Certificate) -> Evidence:
    """`verify` every log with its CA-issued certificates and `reconcile` the coordinator's with each silo's."""
    check_parties(coordinator, silos)
    verifications = tuple(verify_log(log, trusted_certificates(log, ca)) for log in (coordinator, *silos))
    reconciliations = tuple(reconcile(coordinator, silo, ca) for silo in silos)
    return Evidence(verifications, reconciliations)


def _party_check(log: StoredLog, verification: Verification) -> PartyCheck:
    latest = None
    if verification.latest is not None:
        c = verification.latest
        latest = SignedRoot(party=log.party, size=c.size, root=c.root.hex(), time=c.time,
                            signature_ok=verification.latest_signature_ok)
    return PartyCheck(party=log.party, log_name=log.path.name, entries=verification.entries, ok=verification.ok,
                      problems=tuple(p.message for p in verification.problems), latest_root=latest)


def _readable(log: StoredLog, read: Callable[[dict[str, Any]], None]) -> None:
    """`read` each entry's fields; an entry not in the shape the log writes is left out and counted.

    Such an entry was edited: `verify` names it (the page shows that), and the
    page must still be written around it, not fail on a field's type.
    """
    unreadable = 0
    for entry in log.entries:
        try:
            read(entry.fields())
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError):
            unreadable += 1
    if unreadable:
        logger.warning("%s: %d entries are not in the shape the log writes and are left out of the page; "
                       "run `mor audit verify` on it", log.path, unreadable)


def _silo_rows(silo: StoredLog) -> tuple[list[SiloQuery], list[BudgetPoint], PolicyInForce | None]:
    name = _name(silo.party)
    queries, budgets, policies, times = [], [], [], []
    last_budget = None

    def read(fields: dict[str, Any]) -> None:
        nonlocal last_budget
        event, when = fields.get("event"), float(fields.get("time", 0.0))
        privacy = fields.get("privacy") or {}
        ledger = privacy.get("ledger") if event == "call" else fields.get("ledger")
        query = policy = state = None
        if event == "call" and str(fields.get("rpc", "")).startswith(QUERY_PREFIX):
            query = SiloQuery(silo=name, time=when, caller=str(fields.get("caller")),
                              rpc=str(fields["rpc"]).removeprefix(QUERY_PREFIX),
                              objective=str(fields.get("objective") or ""),
                              decision=str(fields.get("decision")), status=str(fields.get("status")),
                              reason=str(fields.get("reason") or ""), items=int(fields.get("items") or 0),
                              epsilon_spent=float(privacy.get("epsilon_spent") or 0.0))
        elif event == "serving_started":
            policy = PolicyInForce(silo=name, digest=str(fields.get("policy_digest")),
                                   text=str(fields.get("policy_text")))
        if ledger:
            state = tuple(float(ledger[key]) for key in ("epsilon_spent", "epsilon_budget", "delta_spent",
                                                         "delta_budget"))
        # Everything read: only now does the entry count (never half of one).
        queries.extend([query] if query else [])
        policies.extend([policy] if policy else [])
        if state is not None and state != last_budget:  # the ledger changes only with training: one point each
            budgets.append(BudgetPoint(silo=name, time=when, epsilon_spent=state[0], epsilon_budget=state[1],
                                       delta_spent=state[2], delta_budget=state[3]))
            last_budget = state
        times.append(when)

    _readable(silo, read)
    policy = policies[-1] if policies else None
    if budgets and times:
        final = budgets[-1]
        end = times[-1]
        if end > final.time:  # carry the last known state to the end of the log, for the plot
            budgets.append(BudgetPoint(silo=name, time=end, epsilon_spent=final.epsilon_spent,
                                       epsilon_budget=final.epsilon_budget, delta_spent=final.delta_spent,
                                       delta_budget=final.delta_budget))
    return queries, budgets, policy


def _coordinator_rows(coordinator: StoredLog) -> tuple[list[RoundSummary], list[RouterWeight]]:
    rounds = []
    totals: dict[tuple[str, str], list[float]] = {}

    def read(fields: dict[str, Any]) -> None:
        if fields.get("event") != "round":
            return
        summary = RoundSummary(time=float(fields.get("time", 0.0)), round_id=str(fields.get("round_id")),
                               objective=str(fields.get("objective")), asked=tuple(fields.get("asked", ())),
                               answered=tuple(fields.get("answered", ())), items=int(fields.get("items", 0)))
        weights = []
        if fields.get("method") == "mor":  # the router's weights only mean something in the router-fused reward
            weights = [(silo, kind, float(mean), int(count))
                       for silo, by_kind in (fields.get("mean_weight") or {}).items()
                       for kind, (mean, count) in by_kind.items()]
        rounds.append(summary)  # only once the whole entry has been read
        for silo, kind, mean, count in weights:
            total = totals.setdefault((silo, kind), [0.0, 0])
            total[0] += mean * count
            total[1] += count

    _readable(coordinator, read)
    weights = [RouterWeight(silo=silo, question_kind=kind, mean_weight=total / count, items=int(count))
               for (silo, kind), (total, count) in sorted(totals.items()) if count]
    return rounds, weights


def report_view(coordinator: StoredLog, silos: Sequence[StoredLog], evidence: Evidence, *,
                title: str = "Consortium audit report") -> ReportView:
    """The page's contents (mor_secure.audit.report renders them)."""
    logs = (coordinator, *silos)
    queries, budgets, policies = [], [], []
    for silo in silos:
        silo_queries, silo_budgets, policy = _silo_rows(silo)
        queries += silo_queries
        budgets += silo_budgets
        if policy is not None:
            policies.append(policy)
    rounds, weights = _coordinator_rows(coordinator)
    return ReportView(
        title=title, generated_at=time.time(),
        parties=tuple(_party_check(log, v) for log, v in zip(logs, evidence.verifications, strict=True)),
        reconciliation=tuple(ReconcileCheck(silo=_name(r.silo), ok=r.ok, queries_matched=r.matched,
                                            checkpoints_checked=r.checkpoints_checked,
                                            mismatches=tuple(r.mismatches)) for r in evidence.reconciliations),
        queries=tuple(queries), budgets=tuple(budgets), router_weights=tuple(weights), rounds=tuple(rounds),
        policies=tuple(policies))
