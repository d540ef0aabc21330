"""The reviewer's page on logs a party can write and verify accepts, but that an honest run does not produce.

Each case builds real logs (the project's AuditLog, the silo's audit trail,
kits from the project's PKI), runs `mor audit report` on them, and reads the
page's figures: the page is always written, in full or not at all, says what
is wrong in red, and claims nothing it cannot back.
"""

from __future__ import annotations

import html
import json
import os
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from mor_cli.audit_cli import main as audit_main
from mor_secure.audit import AuditLog
from mor_secure.audit.checkpoints import canonical_json
from mor_secure.audit.report import render_report, write_report
from mor_secure.audit.report_view import PartyCheck, ReportView, RoundSummary, RouterWeight, SiloQuery
from mor_secure.policy import SiloPolicy
from mor_secure.privacy import PrivacyReport
from mor_secure.privacy.training_config import NOISE_OS_ENTROPY
from mor_secure.wire.messages import LedgerSummary
from silo_agent import audit_trail
from silo_agent.audit_trail import SiloAuditTrail

SILOS = ("hospital-a", "bank-b")
COORDINATOR = "mor://coordinator/coordinator"
AUDITOR = "mor://auditor/auditor"
QUERY = "/mor_secure.proto.v1.SiloRewardService/Score"
PRIVATE_REPORT = PrivacyReport(dp_enabled=True, epsilon=4.0, delta=1e-5, noise_multiplier=1.1, sample_rate=0.2,
                               steps=10, epochs=2, max_grad_norm=1.0, accountant="prv", privacy_unit="image",
                               max_pairs_per_unit=None, noise=NOISE_OS_ENTROPY, private=True, mechanisms=())
CLAIM = "scores of a DP-trained model are post-processing"


def ledger(epsilon_spent: float = 1.0, epsilon_budget: float = 8.0, delta_spent: float = 1e-6,
           delta_budget: float = 1e-5) -> Callable[[], LedgerSummary]:
    def read() -> LedgerSummary:
        return LedgerSummary(epsilon_budget=epsilon_budget, delta_budget=delta_budget, epsilon_spent=epsilon_spent,
                             delta_spent=delta_spent, charges=1, open_reservations=0, head_digest="00" * 32)
    return read


def consortium_logs(tmp_path: Path, pki, *, ledgers: dict | None = None, silo_event: Callable | None = None,
                    policies: dict | None = None, row_count: int = 2, weight: float = 0.5,
                    extra_calls: dict[str, list[dict]] | None = None) -> dict[str, str]:
    """Both silos serve (under `policies[silo]`, one serving start each) and answer three Score calls from the
    coordinator, the last refused ("rate limit"), one MoR round per call counting `row_count` rows;
    `silo_event(silo, i)` overrides fields of a silo's own entry, and `extra_calls[silo]` are calls only the silo
    logs (another caller's), after the coordinator's."""
    coordinator = AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"])
    trails = {s: SiloAuditTrail(AuditLog.for_kit(tmp_path / f"{s}.db", pki.kits[s], checkpoint_every_entries=1),
                                (ledgers or {}).get(s, ledger()), served_report=PRIVATE_REPORT) for s in SILOS}
    for silo, trail in trails.items():
        for policy in (policies or {}).get(silo, [SiloPolicy()]):
            trail.serving_started(silo=silo, policy=policy, policy_source="test", address="127.0.0.1:1")
    for i in range(3):
        refused = i == 2
        for silo, trail in trails.items():
            call = {"event": "call", "rpc": QUERY, "round_id": f"{i:032x}", "objective": "correct", "items": 2,
                    "request_digest": f"{i:02x}{silo}".ljust(64, "0"), "latency_ms": 1.0,
                    "status": "PERMISSION_DENIED" if refused else "OK", "reason": "rate limit" if refused else ""}
            trail.record({**call, "side": "server", "caller": COORDINATOR, "serial": "1",
                          "decision": "refused" if refused else "admitted",
                          **(silo_event(silo, i) if silo_event else {})})
            held = trail.latest_checkpoint()
            coordinator.record({**call, "side": "client", "callee": f"mor://silo/{silo}",
                                "peer_checkpoint": {"body": held.body.hex(), "signature": held.signature.hex()}})
        coordinator.record({"event": "round", "stage": "grpo", "method": "mor", "round_id": f"{i:032x}",
                            "objective": "correct", "asked": list(SILOS), "answered": list(SILOS), "requests": {},
                            "items": 2, "items_digest": "00",
                            "mean_weight": {s: {"shape": [weight, row_count]} for s in SILOS}})
    for silo, calls in (extra_calls or {}).items():
        for k, call in enumerate(calls):
            trails[silo].record({"event": "call", "rpc": QUERY, "side": "server", "serial": "9", "round_id": "",
                                 "objective": "correct", "items": 2, "request_digest": f"{k:064x}",
                                 "latency_ms": 1.0, **call})
    for trail in trails.values():
        trail.close()
    coordinator.close()
    return {"coordinator": str(tmp_path / "coordinator.db"), "ca": str(pki.ca.directory / "ca.pem"),
            **{s: str(tmp_path / f"{s}.db") for s in SILOS}}


def report(logs: dict[str, str], tmp_path: Path, capsys) -> tuple[int, str]:
    """`mor audit report` on the coordinator's and both silos' logs: its exit code and the page."""
    out = tmp_path / "audit.html"
    code = audit_main(["report", logs["coordinator"], *(logs[s] for s in SILOS), "--ca", logs["ca"],
                       "--out", str(out)])
    assert "report written to" in capsys.readouterr().out
    return code, out.read_text(encoding="utf-8")


def figure(page: str, name: str) -> str | None:
    found = re.search(rf'data-figure="{re.escape(name)}"[^>]*>([^<]*)<', page)
    return found and html.unescape(found.group(1))


def section(page: str, sid: str) -> str:
    return page.split(f'<section id="{sid}">')[1].split("</section>")[0]


def claims(page: str) -> str:
    """Who the budget section calls post-processing of a DP-trained model, as it writes them."""
    found = re.search(rf"<p>For ([^:]*): {CLAIM}", section(page, "budget"))
    return found and html.unescape(found.group(1))


# -- 1. a string UTF-8 cannot encode; the report already at --out -------------------------------------------------
@pytest.mark.parametrize("field", ["reason", "status"])
def test_a_lone_surrogate_in_a_logged_string_is_shown_as_its_escape_and_the_page_written(
        pki, tmp_path: Path, capsys, field: str) -> None:
    """Canonical JSON takes "\\ud800" and verify passes the log; UTF-8 cannot encode it nor matplotlib draw it."""
    value = {"reason": "rate limit \ud800", "status": "PERMISSION_DENIED\udc80"}[field]
    logs = consortium_logs(tmp_path, pki, silo_event=lambda s, i: {field: value} if (s, i) == ("bank-b", 2) else {})
    (tmp_path / "audit.html").write_text("the previous report", encoding="utf-8")
    _, page = report(logs, tmp_path, capsys)
    assert html.escape(value.encode("utf-8", "backslashreplace").decode()) in section(page, "refusals")
    assert figure(page, "refusals:bank-b") == "1" and figure(page, "verification:mor://silo/bank-b") == "verified"


@pytest.mark.parametrize("failure", ["unencodable-page", "disk-full"])
def test_a_run_that_fails_to_write_leaves_the_report_already_there_whole(tmp_path: Path, monkeypatch,
                                                                         failure: str) -> None:
    out = tmp_path / "audit.html"
    out.write_text("the previous report", encoding="utf-8")
    if failure == "unencodable-page":
        monkeypatch.setattr("mor_secure.audit.report.render_report", lambda view: "<p>\ud800</p>")
    else:
        def disk_full(fd: int) -> None:
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises((UnicodeEncodeError, OSError)):
        write_report(ReportView("t", 0.0, (), (), (), (), (), (), ()), out)
    assert out.read_text(encoding="utf-8") == "the previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["audit.html"]  # no partial page left beside it


def test_a_report_written_through_a_link_replaces_the_links_target(tmp_path: Path) -> None:
    """latest.html -> 2026-03-08.html: the link was replaced by a file and the dated page never updated (diff review
    helper-77)."""
    (tmp_path / "2026-03-08.html").write_text("the previous report", encoding="utf-8")
    (tmp_path / "latest.html").symlink_to("2026-03-08.html")
    write_report(ReportView("t", 0.0, (), (), (), (), (), (), ()), tmp_path / "latest.html")
    assert (tmp_path / "latest.html").is_symlink() and "<title>t</title>" in (tmp_path / "2026-03-08.html").read_text(
        encoding="utf-8")


# -- 2. a count no log writes ---------------------------------------------------------------------------------------
def test_a_row_count_beyond_2_53_is_not_in_the_logs_shape_and_overflows_nothing(pki, tmp_path: Path, capsys) -> None:
    """Each of three MoR rounds counts 10**308 rows (a JSON integer verify accepts): summed, they overflow a float."""
    code, page = report(consortium_logs(tmp_path, pki, row_count=10**308), tmp_path, capsys)
    assert code == 1 and figure(page, "misshapen:mor://coordinator/coordinator") == "3"
    assert "3 entries of mor://coordinator/coordinator are not in the shape the log writes" in figure(page, "verdict")
    assert "No round of the MoR reward was recorded." in section(page, "router")


@pytest.mark.parametrize("weight", [1e300, -0.5, 1.5])
def test_a_router_weight_outside_0_to_1_is_not_in_the_logs_shape(pki, tmp_path: Path, capsys, weight: float) -> None:
    """A convex mixture's weights are within 0..1: a forged 1e300 set the scale of the router table's shading."""
    code, page = report(consortium_logs(tmp_path, pki, weight=weight), tmp_path, capsys)
    assert code == 1 and figure(page, "misshapen:mor://coordinator/coordinator") == "3"
    assert "No round of the MoR reward was recorded." in section(page, "router")


# -- 3. spent beyond the budget; negative amounts -------------------------------------------------------------------
@pytest.mark.parametrize(("spent", "over"), [
    ({"epsilon_spent": 12.0}, "at most ε 12.00 and δ 1e-06 spent of a budget of ε 8.00 and δ 1e-05"),
    ({"delta_spent": 5e-5}, "at most ε 1.00 and δ 5e-05 spent of a budget of ε 8.00 and δ 1e-05"),
], ids=["epsilon", "delta"])
def test_a_ledger_spent_beyond_its_budget_is_warned_of_and_gets_no_privacy_claim(pki, tmp_path: Path, capsys,
                                                                                spent: dict, over: str) -> None:
    _, page = report(consortium_logs(tmp_path, pki, ledgers={"bank-b": ledger(**spent)}), tmp_path, capsys)
    warning = figure(page, "budget-overspent:bank-b")
    assert warning.startswith("WARNING: bank-b's ledger records more spent than its lifetime budget allows: from ")
    assert over in warning and "makes no claim that bank-b's answers are within a privacy budget" in warning
    assert claims(page) == "hospital-a" and figure(page, "budget-overspent:hospital-a") is None


def test_a_ledger_spent_to_its_budget_within_rounding_is_not_overspent(pki, tmp_path: Path, capsys) -> None:
    """0.1 + 0.2 charged against 0.3 is 0.30000000000000004, which the ledger accepts (BUDGET_RTOL): the page called
    it overspent or altered and withdrew the silo's claim (diff review helper-77)."""
    _, page = report(consortium_logs(tmp_path, pki, ledgers={"bank-b": ledger(epsilon_spent=0.1 + 0.2,
                                                                             epsilon_budget=0.3)}), tmp_path, capsys)
    assert figure(page, "budget-overspent:bank-b") is None and claims(page) == "bank-b, hospital-a"


@pytest.mark.parametrize("negative", [{"epsilon_spent": -5.0}, {"epsilon_budget": -1.0}, {"delta_spent": -1e-6}],
                         ids=["epsilon-spent", "epsilon-budget", "delta-spent"])
def test_a_negative_amount_of_privacy_budget_is_not_in_the_logs_shape(pki, tmp_path: Path, capsys,
                                                                     negative: dict) -> None:
    code, page = report(consortium_logs(tmp_path, pki, ledgers={"bank-b": ledger(**negative)}), tmp_path, capsys)
    # Every entry of bank-b's carries its ledger: its serving start and its three calls.
    assert code == 1 and figure(page, "misshapen:mor://silo/bank-b") == "4"
    assert figure(page, "epsilon-spent:bank-b") is None and claims(page) == "hospital-a"


# -- 4. a silo log that failed verification -------------------------------------------------------------------------
def test_a_silo_whose_log_failed_verification_is_marked_in_every_section_and_gets_no_claim(pki, tmp_path: Path,
                                                                                         capsys) -> None:
    """bank-b's refusal is turned into an answer after it was signed: its log fails verification."""
    logs = consortium_logs(tmp_path, pki)
    with sqlite3.connect(logs["bank-b"]) as db:
        for seq, body in db.execute("SELECT seq, body FROM entries").fetchall():
            if (fields := json.loads(body)).get("status") == "PERMISSION_DENIED":
                fields.update(status="OK", decision="admitted", reason="")
                db.execute("UPDATE entries SET body = ? WHERE seq = ?", (canonical_json(fields), seq))
    _, page = report(logs, tmp_path, capsys)
    assert figure(page, "verification:mor://silo/bank-b") == "FAILED"
    marked = 'bank-b <span class="bad">(log FAILED verification)</span>'
    for sid in ("summary", "budget", "checks", "policies"):
        assert marked in section(page, sid), sid
    for sid in ("queries", "budget"):  # the plots' legends and titles
        assert "bank-b (log FAILED verification)" in section(page, sid).split("<svg", 1)[1], sid
    assert "hospital-a (log FAILED" not in page
    assert figure(page, "unverified:bank-b").startswith("WARNING: bank-b's log FAILED verification")
    assert claims(page) == "hospital-a"


def test_the_sections_read_from_a_coordinators_log_that_failed_verification_say_so() -> None:
    parties = (PartyCheck(COORDINATOR, "coordinator.db", 9, False, ("entry 3: edited after it was written",), None),
               PartyCheck("mor://silo/hospital-a", "hospital-a.db", 9, True, (), None))
    page = render_report(ReportView("t", 2e9, parties, (), (), (), (RouterWeight("hospital-a", "shape", 1.0, 2),),
                                    (RoundSummary(1.9e9, "r0", "correct", ("hospital-a",), ("hospital-a",), 2),), ()))
    warning = (f"WARNING: this section is read from the log of {COORDINATOR}, which FAILED verification: nothing "
               "in it is vouched for.")
    assert warning in section(page, "router") and warning in section(page, "rounds")
    assert "(log FAILED verification)" not in section(page, "summary")  # hospital-a's own log verified


# -- 5. a budget that changed while the silo served ----------------------------------------------------------------
def test_a_lifetime_budget_raised_while_the_silo_serves_is_warned_of_with_both_values(pki, tmp_path: Path, capsys,
                                                                                    monkeypatch) -> None:
    monkeypatch.setattr(audit_trail, "LEDGER_REFRESH_SECONDS", 0.0)  # a fresh ledger read with every entry
    budgets = iter([2.0, 2.0, 50.0])  # serving start and call 0 at 2, then 50

    def raised() -> LedgerSummary:
        return ledger(epsilon_budget=next(budgets, 50.0))()

    _, page = report(consortium_logs(tmp_path, pki, ledgers={"bank-b": raised}), tmp_path, capsys)
    warning = figure(page, "budget-limit-changed:bank-b")
    assert warning.startswith("WARNING: bank-b's lifetime budget changed after it began serving (")
    assert "from ε 2.00 and δ 1e-05 to ε 50.00 and δ 1e-05" in warning
    assert len(re.findall(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", warning)) == 2  # serving began, then the change
    assert claims(page) == "hospital-a" and figure(page, "budget-rise:bank-b") is None


# -- 6. nothing on record ------------------------------------------------------------------------------------------
def test_logs_with_no_entries_are_not_called_checked_roots(pki, tmp_path: Path, capsys) -> None:
    for name in ("coordinator", *SILOS):
        AuditLog.for_kit(tmp_path / f"{name}.db", pki.kits[name]).close()
    logs = {"ca": str(pki.ca.directory / "ca.pem"), **{n: str(tmp_path / f"{n}.db") for n in ("coordinator", *SILOS)}}
    code, page = report(logs, tmp_path, capsys)
    assert code == 0 and figure(page, "verdict") == (
        "INTACT, but empty — the 3 logs verified hold no entries and no signed root: there is no record yet to "
        "vouch for.")


# -- 7. who asked ----------------------------------------------------------------------------------------------------
def test_a_silos_calls_are_broken_down_by_caller_and_other_callers_answered_are_warned_of(pki, tmp_path: Path,
                                                                                         capsys) -> None:
    answered = {"status": "OK", "decision": "admitted", "reason": ""}
    logs = consortium_logs(tmp_path, pki, extra_calls={"bank-b": [
        {"caller": AUDITOR, **answered}, {"caller": "mor://silo/hospital-a", **answered},
        {"caller": AUDITOR, "status": "PERMISSION_DENIED", "decision": "refused", "reason": "caller not allowed"}]})
    _, page = report(logs, tmp_path, capsys)
    assert figure(page, f"calls-from:bank-b {COORDINATOR}") == "3"
    assert figure(page, f"calls-from:bank-b {AUDITOR}") == "2"
    assert figure(page, "calls-from:bank-b mor://silo/hospital-a") == "1"
    assert f'<span class="bad">{AUDITOR} (not the coordinator)</span>' in section(page, "queries")
    assert figure(page, "other-callers:bank-b").startswith(
        f"WARNING: bank-b answered 2 calls from callers other than the coordinator ({AUDITOR}: 1; "
        "mor://silo/hospital-a: 1).")
    assert figure(page, "other-callers:hospital-a") is None


# -- 8. every policy a silo served under ----------------------------------------------------------------------------
def test_every_distinct_policy_a_silo_served_under_is_shown_with_when_it_took_effect(pki, tmp_path: Path,
                                                                                   capsys) -> None:
    strict = SiloPolicy()
    permissive = SiloPolicy.model_validate({**strict.model_dump(), "daily_cap": 10**9})
    logs = consortium_logs(tmp_path, pki, policies={"hospital-a": [permissive, strict, strict]})
    _, page = report(logs, tmp_path, capsys)
    policies = section(page, "policies")
    assert figure(page, "policies:hospital-a") == "2 policies" and figure(page, "policies:bank-b") == "1 policy"
    assert "1000000000" in policies  # the permissive one's daily cap
    hospital = policies.split("<h3>hospital-a")[1]
    # A restart under the policy in force is not a new one: two policies, each with the start that put it in force.
    assert len(re.findall(r"Took effect at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ; digest", hospital)) == 2


# -- 9. one silo's many refusal reasons --------------------------------------------------------------------------------
def test_one_silos_many_callers_leave_every_other_silos_in_the_caller_table() -> None:
    """The callers table was cut at 500 rows, silo by silo: one silo's log naming 510 callers hid every later
    silo's (diff review helper-77)."""
    def answered(silo: str, k: int, caller: str) -> SiloQuery:
        return SiloQuery(silo, 1.9e9 + k, caller, "Score", "correct", "admitted", "OK", "", 0, 0.0)

    queries = (*(answered("bank-b", k, f"mor://auditor/a{k}") for k in range(510)),
               answered("hospital-a", 0, COORDINATOR))
    parties = tuple(PartyCheck(party, "log", 1, True, (), None) for party in (COORDINATOR, "mor://silo/bank-b"))
    queries_section = section(render_report(ReportView("t", 2e9, parties, (), queries, (), (), (), ())), "queries")
    rows = re.findall(r"<tr><td>([\w-]+)</td><td>(.*?)</td>", queries_section)
    assert [silo for silo, _ in rows].count("bank-b") == 21 and ("hospital-a", COORDINATOR) in rows
    assert rows[20] == ("bank-b", '<span class="bad">490 other callers, together</span>')
    assert figure(queries_section, "calls-from-others:bank-b") == "490"
    warning = figure(queries_section, "other-callers:bank-b")
    assert warning.startswith("WARNING: bank-b answered 510 calls") and "; and 490 other callers)" in warning


def test_one_silos_many_refusal_reasons_leave_every_other_silos_in_the_table() -> None:
    """bank-b (listed first) refuses the auditor 510 times, each for its own reason; hospital-a refuses once."""
    def refusal(silo: str, k: int, reason: str) -> SiloQuery:
        return SiloQuery(silo, 1.9e9 + k, AUDITOR, "Score", "correct", "refused", "PERMISSION_DENIED", reason, 0, 0.0)

    queries = (*(refusal("bank-b", k, f"caller not allowed #{k}") for k in range(510)),
               refusal("hospital-a", 0, "rate limit"))
    refusals = section(render_report(ReportView("t", 2e9, (), (), queries, (), (), (), ())), "refusals")
    rows = re.findall(r"<tr><td>([\w-]+)</td><td>(.*?)</td>", refusals)
    assert [silo for silo, _ in rows].count("bank-b") == 21 and ("hospital-a", "rate limit") in rows
    assert rows[20] == ("bank-b", '<span class="muted">the other 490 reasons and statuses, together</span>')
    assert figure(refusals, "other-reasons:bank-b") == "490" and "Showing the first" not in refusals
