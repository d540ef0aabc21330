"""Both sides of every call on record: a real silo server and a coordinator client, their logs reconciled.

A silo served over mTLS on 127.0.0.1 (port 0, the project's PKI) with its
audit log; the coordinator's client and fusion write to the coordinator's
log. Then the reviewer's commands run on the files: verify, reconcile,
report. The tamper cases are insiders holding their own party's key: they
rewrite their log and re-sign it, which `verify` cannot catch and
`reconcile` must.
"""

from __future__ import annotations

import base64
import html
import json
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from silo_fakes import RightAnswerModel, png

from coordinator.fusion import ClearFusion, FusionItems
from coordinator.network_client import NetworkSiloClient
from mor_cli.audit_cli import main as audit_main
from mor_cli.main import main as mor_main
from mor_secure.audit import AuditLog, read_log
from mor_secure.audit import checkpoints
from mor_secure.audit.checkpoints import CheckpointSigner, canonical_json
from mor_secure.audit.merkle import MerkleTree, leaf_hash
from mor_secure.audit.reconcile import QUERY_PREFIX
from mor_secure.models.reward_model import Standardisation
from mor_secure.pki import CertificateAuthority, CertKit
from mor_secure.policy import SiloAdmission, SiloPolicy
from mor_secure.privacy import PrivacyReport
from mor_secure.privacy.training_config import NOISE_OS_ENTROPY
from mor_secure.transport.server import serve
from mor_secure.wire import ErrorCode, ImageBlob, ScoreRequest, ScoreRow, SiloError
from mor_secure.wire.messages import LedgerSummary
from silo_agent import audit_trail
from silo_agent.audit_trail import SiloAuditTrail
from silo_agent.service import SiloService
from silo_agent.servicer import ROLES_BY_RPC, servicer_registration
from silo_agent.serving import audit_log_path, start_silo_server
from silo_agent.training import load_silo_config

RED = ImageBlob.of(png((200, 30, 30)))
GOOD = ScoreRequest(objective="correct", images=(RED,), rows=(ScoreRow(0, "what shape?", "right"),
                                                              ScoreRow(0, "what shape?", "wrong")))
SCORES = (3.96875, -0.03125)  # what TelltaleScoresModel answers GOOD with


class TelltaleScoresModel(RightAnswerModel):
    """RightAnswerModel scoring "right" 3.96875 and anything else -0.03125: numbers no other field of an entry holds
    (latencies have 3 decimals, the router's weights here are 1.0), so a score copied into a log is found."""

    def __init__(self) -> None:
        super().__init__()
        self.standardisation = Standardisation(mean=0.0078125, std=0.25)


def request_data_in(bodies: list[bytes]) -> list[str]:
    """Which of GOOD's images, prompts and responses, and of the scores, appear in `bodies` as JSON would write them
    (text, image bytes as hex or base64, scores as numbers)."""
    text = b"\n".join(bodies).decode("ascii")  # canonical JSON is ASCII
    data = {"the prompt": GOOD.rows[0].prompt, **{f"the response {row.response!r}": row.response for row in GOOD.rows},
            "the image bytes as hex": RED.data.hex(), "the image bytes as base64": base64.b64encode(RED.data).decode()}
    found = [name for name, value in data.items() if value in text]
    # A score as a JSON number: not a digit run inside a longer number (a time's decimals, say).
    return found + [f"the score {score!r}" for score in SCORES
                    if re.search(rf"(?<![\d.]){re.escape(repr(score))}(?!\d)", text)]


def served_hospital_a(pki, tmp_path: Path):
    """hospital-a served over mTLS with its audit log in `tmp_path`, and the coordinator's log there: (silo log,
    running server, coordinator log); the caller stops and closes them."""
    silo_log = AuditLog.for_kit(tmp_path / "hospital-a.db", pki.kits["hospital-a"], checkpoint_every_entries=1)
    service = SiloService("hospital-a", TelltaleScoresModel(), allowed_objectives=frozenset({"correct"}))
    running = serve(kit=pki.kits["hospital-a"], crl_path=pki.crl, services=[servicer_registration(service)],
                    roles_by_rpc=ROLES_BY_RPC, admission=SiloAdmission(SiloPolicy()), audit=silo_log)
    running.set_serving(True)
    return silo_log, running, AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"])


@pytest.fixture
def consortium_run(pki, tmp_path: Path) -> dict[str, Path]:
    """One silo served, a coordinator that scores, is refused once, describes, and fuses one round."""
    silo_log, running, coordinator_log = served_hospital_a(pki, tmp_path)
    client = NetworkSiloClient("hospital-a", f"127.0.0.1:{running.port}", pki.kits["coordinator"], retries=0,
                               audit=coordinator_log)
    try:
        assert client.score(GOOD).scores == SCORES
        with pytest.raises(SiloError) as refused:
            client.score(ScoreRequest(objective="correct_and_brief", images=GOOD.images, rows=GOOD.rows))
        assert refused.value.code == ErrorCode.PERMISSION_DENIED
        assert client.describe().name == "hospital-a"
        image = tmp_path / "red.png"
        image.write_bytes(RED.data)
        fusion = ClearFusion([client], audit=coordinator_log, method="mor")
        items = FusionItems(images=(image, image), prompts=("what shape?",) * 2, responses=("right", "wrong"),
                            kinds=("shape", "shape"))
        assert fusion.fuse(items, torch.ones(2, 1)).tolist() == list(SCORES)
    finally:
        client.close()
        running.stop(0)
        silo_log.close()
        coordinator_log.close()
    return {"silo": tmp_path / "hospital-a.db", "coordinator": tmp_path / "coordinator.db"}


def cli(*argv: str, capsys) -> tuple[int, str]:
    code = audit_main(list(argv))
    return code, capsys.readouterr().out


def test_every_call_is_on_both_records_and_they_reconcile(consortium_run, pki, capsys) -> None:
    silo = [e.fields() for e in read_log(consortium_run["silo"]).entries]
    coordinator = [e.fields() for e in read_log(consortium_run["coordinator"]).entries]
    calls = [e for e in coordinator if e["event"] == "call"]
    assert [(e["rpc"].rsplit("/", 1)[1], e["status"]) for e in calls] == [
        ("Score", "OK"), ("Score", "PERMISSION_DENIED"), ("Describe", "OK"), ("Score", "OK")]
    served = [e for e in silo if e["event"] == "call"]
    assert [(e["caller"], e["status"]) for e in served] == [("mor://coordinator/coordinator", s["status"])
                                                            for s in calls]
    assert [e["request_digest"] for e in served] == [e["request_digest"] for e in calls]
    assert all(e["peer_checkpoint"] for e in calls)  # every answer carried the silo's tree head
    # Digests, never data (docs/threat-model.md cites this): no entry holds what was asked or answered.
    bodies = [e.body for path in consortium_run.values() for e in read_log(path).entries]
    assert request_data_in(bodies) == []
    assert request_data_in([canonical_json({"leaked": [GOOD.rows[0].prompt, RED.data.hex(), *SCORES]})]) == [
        "the prompt", "the image bytes as hex", "the score 3.96875", "the score -0.03125"]  # and the search finds them
    (round_entry,) = [e for e in coordinator if e["event"] == "round"]
    assert round_entry["round_id"] == calls[-1]["round_id"] and round_entry["answered"] == ["hospital-a"]
    assert round_entry["requests"] == {"hospital-a": [calls[-1]["request_digest"]]}  # what it sent, weights included
    assert round_entry["mean_weight"] == {"hospital-a": {"shape": [1.0, 2]}} and round_entry["method"] == "mor"

    assert cli("verify", str(consortium_run["silo"]), "--cert", str(pki.kits["hospital-a"].cert_path),
               capsys=capsys)[0] == 0
    code, out = cli("verify", str(consortium_run["coordinator"]), "--cert", str(pki.kits["coordinator"].cert_path),
                    capsys=capsys)
    assert code == 0 and "VERIFIED" in out
    code, out = cli("reconcile", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 0, out
    assert "4 queries found in both logs" in out and "4 of its checkpoints checked" in out and "RECONCILED" in out


def test_verify_with_the_wrong_certificate_fails_naming_the_checkpoints(consortium_run, pki, capsys) -> None:
    code, out = cli("verify", str(consortium_run["silo"]), "--cert", str(pki.kits["bank-b"].cert_path), capsys=capsys)
    assert code == 1 and "FAILED" in out and "which none of the given certificates holds" in out
    # Another party's certificate, not a renewed kit's: said so, not "as after a renewal".
    assert "None of the certificates given is mor://silo/hospital-a's (they name mor://silo/bank-b)" in out
    assert "renewal" not in out


def test_a_log_signed_across_a_renewal_verifies_against_the_ca_not_the_new_certificate_alone(
        pki, tmp_path: Path, monkeypatch, capsys) -> None:
    """The kit keeps no old certificate, so `--cert kit/party.pem` after a renewal failed on every checkpoint
    before it (17 problems in the review's probe) with nothing saying why or what to do."""
    monkeypatch.setattr(checkpoints, "KIT_CHECK_SECONDS", 0.0)  # the renewed kit is picked up at the next entry
    kit_dir, identity = tmp_path / "kit", pki.kits["hospital-a"].identity()
    old_serial = pki.ca.issue(identity, kit_dir).certificate().serial_number
    log = AuditLog.for_kit(tmp_path / "silo.db", CertKit.load(kit_dir), checkpoint_every_entries=1)
    try:
        log.record({"event": "call"})
        new_kit = pki.ca.issue(identity, kit_dir, renew=True)
        log.record({"event": "call"})
    finally:
        log.close()
    serials = f"{old_serial:x}", f"{new_kit.certificate().serial_number:x}"

    code, out = cli("verify", str(tmp_path / "silo.db"), "--cert", str(new_kit.cert_path), capsys=capsys)
    assert code == 1 and "which none of the given certificates holds" in out
    assert f"other certificate(s) naming mor://silo/hospital-a (serials {serials[0]})" in out and "--ca" in out
    code, out = cli("verify", str(tmp_path / "silo.db"), "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 0 and "VERIFIED" in out and "2 signed checkpoints" in out, out
    assert "the 2 certificate(s) of mor://silo/hospital-a" in out and all(s in out for s in serials)

    other_ca = CertificateAuthority.create(tmp_path / "other-ca")
    code, out = cli("verify", str(tmp_path / "silo.db"), "--ca", str(other_ca.directory / "ca.pem"), capsys=capsys)
    assert code == 1 and "the 0 certificate(s)" in out and "serials none" in out and "FAILED" in out
    assert audit_main(["verify", str(tmp_path / "silo.db"), "--ca", str(pki.ca.directory / "ca.pem"),
                       "--cert", str(new_kit.cert_path)]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_verify_says_how_many_problems_it_found_beyond_those_it_lists(pki, tmp_path: Path, capsys) -> None:
    """It lists the first 50 (MAX_PROBLEMS) and printed "FAILED: 50 problem(s)" for a log with 125."""
    log = AuditLog.for_kit(tmp_path / "silo.db", pki.kits["hospital-a"], checkpoint_every_entries=1)
    try:
        for _ in range(60):
            log.record({"event": "call"})
    finally:
        log.close()
    code, out = cli("verify", str(tmp_path / "silo.db"), "--cert", str(pki.kits["bank-b"].cert_path), capsys=capsys)
    assert code == 1 and "FAILED: 60 problem(s), the first 50 listed" in out, out
    assert out.count("which none of the given certificates holds") == 50
    with sqlite3.connect(tmp_path / "silo.db") as connection:  # the first bad entry too, though its problem is 61st
        connection.execute("UPDATE entries SET body = CAST(REPLACE(CAST(body AS TEXT), 'call', 'cal!') AS BLOB) "
                           "WHERE seq = 3")
    code, out = cli("verify", str(tmp_path / "silo.db"), "--cert", str(pki.kits["bank-b"].cert_path), capsys=capsys)
    assert code == 1 and "the first 50 listed; the first bad entry is entry 3" in out, out
    with sqlite3.connect(tmp_path / "silo.db") as connection:  # the page says it too: 60 entries altered
        connection.execute("UPDATE entries SET body = CAST(REPLACE(CAST(body AS TEXT), 'call', 'cal!') AS BLOB)")
    AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"]).close()
    code, _ = cli("report", str(tmp_path / "coordinator.db"), str(tmp_path / "silo.db"), "--ca",
                  str(pki.ca.directory / "ca.pem"), "--out", str(tmp_path / "audit.html"), capsys=capsys)
    page = (tmp_path / "audit.html").read_text(encoding="utf-8")
    found = int(re.search(r"verification of mor://silo/hospital-a \((\d+) problems\)", page)[1])
    assert code == 1 and found > 50 and f"and {found - 50} more problems, not listed" in page


def test_reconcile_says_how_many_mismatches_it_found_beyond_those_it_lists(pki, tmp_path: Path, capsys) -> None:
    """It lists the first 100 (MAX_MISMATCHES) and dropped the rest uncounted: "MISMATCH: 100 finding(s)" for a
    silo that answered 105 calls the coordinator never logged (report review helper-75)."""
    silo = AuditLog.for_kit(tmp_path / "silo.db", pki.kits["hospital-a"], checkpoint_every_entries=1)
    try:
        for k in range(105):
            silo.record({"event": "call", "side": "server", "rpc": f"{QUERY_PREFIX}Score",
                         "caller": "mor://coordinator/coordinator", "round_id": f"r{k}", "request_digest": f"{k:064x}",
                         "items": 1, "decision": "admitted", "status": "OK", "reason": "", "latency_ms": 1.0})
    finally:
        silo.close()
    AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"]).close()
    logs, ca = (str(tmp_path / "coordinator.db"), str(tmp_path / "silo.db")), str(pki.ca.directory / "ca.pem")
    code, out = cli("reconcile", *logs, "--ca", ca, capsys=capsys)
    assert code == 1 and "MISMATCH: 105 finding(s), the first 100 listed" in out, out
    code, _ = cli("report", *logs, "--ca", ca, "--out", str(tmp_path / "audit.html"), capsys=capsys)
    page = (tmp_path / "audit.html").read_text(encoding="utf-8")
    assert code == 1 and "reconciliation of hospital-a with the coordinator (105 mismatches)" in page
    assert "and 5 more mismatches, not listed" in page


def test_reconcile_prints_a_lone_surrogate_a_log_holds_as_its_escape(pki, tmp_path: Path, capsys) -> None:
    """Canonical JSON takes "\\ud800": reconcile printed "MISMATCH: 1 finding(s)", then a UTF-8 error in place of
    the finding that quoted it (diff review helper-77)."""
    silo = AuditLog.for_kit(tmp_path / "silo.db", pki.kits["hospital-a"], checkpoint_every_entries=1)
    try:
        silo.record({"event": "call", "side": "server", "rpc": f"{QUERY_PREFIX}Score",
                     "caller": "mor://coordinator/coordinator", "round_id": "r\ud800", "request_digest": "0" * 64,
                     "items": 1, "decision": "admitted", "status": "OK", "reason": "", "latency_ms": 1.0})
    finally:
        silo.close()
    AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"]).close()
    code, out = cli("reconcile", str(tmp_path / "coordinator.db"), str(tmp_path / "silo.db"), "--ca",
                    str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 1 and "Score (round r\\ud800, request 000000000000...) from mor://coordinator/coordinator is not " \
        "in the coordinator's log" in out, out


def test_identical_requests_are_paired_by_the_checkpoint_their_answers_carried(pki, tmp_path: Path,
                                                                               capsys) -> None:
    """Every Describe has one digest and no round. A Describe made off the coordinator's record (grpcurl with its
    kit) was paired with the coordinator's answered one, whose own silo entry then went to a later Describe that
    never reached the stopped silo: "the silo answered a call the coordinator logged as not delivered (benign
    only if ...)", naming the wrong entries, and the off-record call was not named (docs review helper-67)."""
    silo_log, running, coordinator_log = served_hospital_a(pki, tmp_path)
    address = f"127.0.0.1:{running.port}"
    off_record = NetworkSiloClient("hospital-a", address, pki.kits["coordinator"], retries=0)
    client = NetworkSiloClient("hospital-a", address, pki.kits["coordinator"], retries=0, audit=coordinator_log)
    try:
        assert off_record.describe().name == client.describe().name == "hospital-a"
        running.stop(0)
        with pytest.raises(SiloError) as lost:
            client.describe()
        assert lost.value.code == ErrorCode.UNAVAILABLE
    finally:
        off_record.close()
        client.close()
        running.stop(0)
        silo_log.close()
        coordinator_log.close()
    code, out = cli("reconcile", str(tmp_path / "coordinator.db"), str(tmp_path / "hospital-a.db"),
                    "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 1 and "1 queries found in both logs, 1 that never reached the silo" in out, out
    assert "mor://silo/hospital-a's entry 0: Describe (round -, request e3b0c44298fc...) from " \
           "mor://coordinator/coordinator is not in the coordinator's log" in out, out
    assert "not delivered, but" not in out and "MISMATCH: 1 finding(s)" in out


def rewrite(path: Path, kit, change: Callable[[list[dict]], list[dict]]) -> None:
    """An insider's rewrite: change the entries, re-chain every one and re-sign, with the party's own key."""
    entries = [{k: v for k, v in e.fields().items() if k not in ("index", "prev_root")} for e in read_log(path).entries]
    tree, signer = MerkleTree(), CheckpointSigner.from_kit(kit)
    with sqlite3.connect(path) as connection:
        connection.execute("DELETE FROM entries")
        connection.execute("DELETE FROM checkpoints")
        for index, fields in enumerate(change(entries)):
            body = canonical_json({**fields, "index": index, "prev_root": tree.root().hex()})
            connection.execute("INSERT INTO entries(seq, body, leaf_hash) VALUES (?, ?, ?)",
                               (index, body, leaf_hash(body)))
            tree.append(leaf_hash(body))
        signed = signer.sign(size=tree.size, root=tree.root(), time=time.time(), signs_every=1)
        connection.execute("INSERT INTO checkpoints(size, body, signature) VALUES (?, ?, ?)",
                           (tree.size, signed.body, signed.signature))


def test_a_silo_that_rewrites_an_earlier_entry_after_giving_a_checkpoint_is_caught(consortium_run, pki, capsys) -> None:
    def refusal_becomes_an_answer(entries: list[dict]) -> list[dict]:
        first_refusal = next(e for e in entries if e.get("status") == "PERMISSION_DENIED")
        first_refusal.update(status="OK", decision="admitted", reason="")
        return entries

    rewrite(consortium_run["silo"], pki.kits["hospital-a"], refusal_becomes_an_answer)
    code, _ = cli("verify", str(consortium_run["silo"]), "--cert", str(pki.kits["hospital-a"].cert_path),
                  capsys=capsys)
    assert code == 0  # re-signed with its own key: alone, its log looks whole
    code, out = cli("reconcile", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 1 and "MISMATCH" in out
    assert "ended PERMISSION_DENIED, but mor://silo/hospital-a's entry 1 says OK" in out
    assert ("coordinator entry 1: mor://silo/hospital-a's log is not consistent with the checkpoint it signed then "
            "(size 2): entries before 2 were rewritten after it was signed") in out
    assert "checkpoint it signed then (size 1)" not in out  # what came before the rewrite still checks out


def test_answers_that_carried_no_checkpoint_are_mismatches(consortium_run, pki, capsys) -> None:
    """A silo that sends no tree heads could later rewrite its log and re-sign it; reconcile names every such answer."""
    def as_if_the_silo_sent_none(entries: list[dict]) -> list[dict]:
        return [{**e, "peer_checkpoint": None} if e.get("event") == "call" else e for e in entries]

    rewrite(consortium_run["coordinator"], pki.kits["coordinator"], as_if_the_silo_sent_none)
    code, out = cli("reconcile", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 1 and "MISMATCH" in out
    assert out.count("without mor://silo/hospital-a's checkpoint") == 4
    assert "was answered PERMISSION_DENIED without mor://silo/hospital-a's checkpoint" in out


def test_a_retry_after_unavailable_reconciles(consortium_run, pki, capsys) -> None:
    """The client retries UNAVAILABLE with the same request: two coordinator entries, one silo entry, no mismatch."""
    def first_score_retried(entries: list[dict]) -> list[dict]:
        first = next(i for i, e in enumerate(entries) if str(e.get("rpc", "")).endswith("/Score"))
        attempt = {**entries[first], "status": "UNAVAILABLE", "reason": "failed to connect", "peer_checkpoint": None}
        return [*entries[:first], attempt, *entries[first:]]

    rewrite(consortium_run["coordinator"], pki.kits["coordinator"], first_score_retried)
    code, out = cli("reconcile", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 0, out
    assert "4 queries found in both logs, 1 that never reached the silo" in out and "RECONCILED" in out


def test_a_coordinator_that_logs_an_answered_call_as_not_delivered_is_a_mismatch(consortium_run, pki,
                                                                                 capsys) -> None:
    """The coordinator rewrites an answered Score as UNAVAILABLE and drops the checkpoint it got with the answer;
    the silo's entry for that very request says it answered OK."""
    def answer_hidden(entries: list[dict]) -> list[dict]:
        answered = next(e for e in entries if str(e.get("rpc", "")).endswith("/Score") and e.get("status") == "OK")
        answered.update(status="UNAVAILABLE", reason="failed to connect", peer_checkpoint=None)
        return entries

    rewrite(consortium_run["coordinator"], pki.kits["coordinator"], answer_hidden)
    code, out = cli("reconcile", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 1 and "MISMATCH: 1 finding(s)" in out, out
    assert re.search(r"coordinator entry 0: Score \(round -, request \w{12}\.\.\.\) is logged UNAVAILABLE, as not "
                     r"delivered, but mor://silo/hospital-a's entry 0 says it answered OK: the silo answered a call "
                     r"the coordinator logged as not delivered", out), out


def test_a_status_in_a_shape_the_log_never_writes_is_a_mismatch_not_a_crash(consortium_run, pki, capsys,
                                                                            tmp_path: Path) -> None:
    def status_as_a_list(entries: list[dict]) -> list[dict]:
        next(e for e in entries if e.get("status") == "OK")["status"] = ["OK"]
        return entries

    rewrite(consortium_run["coordinator"], pki.kits["coordinator"], status_as_a_list)
    code, out = cli("reconcile", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 1 and "ended ['OK'], but mor://silo/hospital-a's entry 0 says OK" in out, out
    code, out = cli("report", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), "--out", str(tmp_path / "audit.html"), capsys=capsys)
    assert code == 1 and "NOT INTACT" in out


def test_a_held_checkpoint_holding_a_number_beyond_float_range_is_a_mismatch_not_a_crash(consortium_run, pki,
                                                                                        capsys) -> None:
    """1e400 is valid JSON grammar and parses to infinity; the coordinator re-signs its own log around it."""
    def size_beyond_float(entries: list[dict]) -> list[dict]:
        held = next(e for e in entries if e.get("peer_checkpoint"))["peer_checkpoint"]
        body = json.loads(bytes.fromhex(held["body"]))
        held["body"] = bytes.fromhex(held["body"]).replace(b'"size":%d' % body["size"], b'"size":1e400').hex()
        return entries

    rewrite(consortium_run["coordinator"], pki.kits["coordinator"], size_beyond_float)
    code, out = cli("reconcile", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 1
    assert ("coordinator entry 0: the checkpoint the silo sent with its answer does not verify (checkpoint body "
            "does not parse") in out, out


def test_a_coordinator_that_drops_a_query_from_its_record_is_caught(consortium_run, pki, capsys) -> None:
    def drop_the_describe(entries: list[dict]) -> list[dict]:
        return [e for e in entries if not str(e.get("rpc", "")).endswith("/Describe")]

    rewrite(consortium_run["coordinator"], pki.kits["coordinator"], drop_the_describe)
    code, out = cli("reconcile", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 1
    assert "mor://silo/hospital-a's entry 2: Describe (round -, request" in out
    assert "from mor://coordinator/coordinator is not in the coordinator's log" in out


@pytest.mark.parametrize("command", ["reconcile", "report"])
def test_a_coordinator_log_whose_party_was_renamed_leaves_the_real_coordinators_queries_unmatched(
        consortium_run, pki, capsys, tmp_path: Path, command: str) -> None:
    """Reconcile once matched only the silo entries whose caller was the party the coordinator's log names: emptied
    and renamed (no key needed), that log matched none, and every query the silo answered passed as RECONCILED, the
    page as INTACT. Another coordinator identity's genuine log stands in the same way."""
    with sqlite3.connect(consortium_run["coordinator"]) as connection:
        connection.execute("DELETE FROM entries")
        connection.execute("DELETE FROM checkpoints")
        connection.execute("UPDATE meta SET value = 'mor://coordinator/nobody' WHERE key = 'party'")
    extra = ["--out", str(tmp_path / "audit.html")] if command == "report" else []
    code, out = cli(command, str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), *extra, capsys=capsys)
    assert code == 1 and "RECONCILED" not in out and "record INTACT" not in out, out
    if command == "reconcile":
        assert ("mor://silo/hospital-a's entry 0: Score (round -, request" in out and "from "
                "mor://coordinator/coordinator is not in the coordinator's log given (it is mor://coordinator/nobody's)"
                in out)
        assert out.count("is not in the coordinator's log given") == 4  # three Scores (one refused), the Describe


def test_a_coordinator_entry_naming_no_callee_is_not_taken_for_a_call_to_the_silo(consortium_run, pki,
                                                                                 capsys) -> None:
    def callee_removed(entries: list[dict]) -> list[dict]:
        next(e for e in entries if e.get("side") == "client" and e.get("status") == "OK")["callee"] = None
        return entries

    rewrite(consortium_run["coordinator"], pki.kits["coordinator"], callee_removed)
    code, out = cli("reconcile", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 1 and "mor://silo/hospital-a's entry 0: Score (round -, request" in out, out
    assert out.count("from mor://coordinator/coordinator is not in the coordinator's log") == 1


def test_reconcile_names_a_silo_entry_by_its_position_not_its_stored_number(consortium_run, pki, capsys) -> None:
    """A silo that handed out stale heads (size 0) is caught because they do not cover its own entries; renumbering
    those entries below 0 once hid it, since the check compared stored numbers while the tree is built in storage
    order."""
    stale = CheckpointSigner.from_kit(pki.kits["hospital-a"]).sign(size=0, root=MerkleTree().root(), time=time.time(),
                                                                              signs_every=1)

    def stale_heads(entries: list[dict]) -> list[dict]:
        for entry in entries:
            if entry.get("peer_checkpoint"):
                entry["peer_checkpoint"] = {"body": stale.body.hex(), "signature": stale.signature.hex()}
        return entries

    rewrite(consortium_run["coordinator"], pki.kits["coordinator"], stale_heads)
    with sqlite3.connect(consortium_run["silo"]) as connection:
        connection.execute("UPDATE entries SET seq = seq - 1000")
    code, out = cli("reconcile", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 1 and "the silo's checkpoint (size 0) does not cover its own entry 0 for that call" in out, out
    code, out = cli("verify", str(consortium_run["silo"]), "--cert", str(pki.kits["hospital-a"].cert_path),
                    capsys=capsys)
    assert code == 1 and "entry 0 is stored numbered -1000: the entries were renumbered" in out


def test_the_report_is_written_from_the_logs(consortium_run, pki, capsys, tmp_path: Path) -> None:
    out_file = tmp_path / "report" / "audit.html"
    code, out = cli("report", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), "--out", str(out_file), capsys=capsys)
    assert code == 0 and "record INTACT" in out and str(out_file.resolve()) in out
    page = out_file.read_text(encoding="utf-8")

    def figure(name: str) -> str:
        found = re.search(rf'data-figure="{re.escape(name)}"[^>]*>\s*([^<]*?)\s*<', page)
        assert found, name
        return found.group(1)

    assert figure("queries:hospital-a") == "4" and figure("refusals:hospital-a") == "1"
    assert figure("verification:mor://silo/hospital-a") == "verified"
    assert figure("reconciliation:hospital-a") == "reconciled" and figure("verdict").startswith("INTACT")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # self-contained: nothing fetched


@pytest.mark.parametrize("command", ["reconcile", "report"])
def test_logs_given_in_the_wrong_roles_are_refused_not_reconciled(consortium_run, pki, capsys, tmp_path: Path,
                                                                   command: str) -> None:
    """Swapped, or the coordinator's log against itself, once matched nothing and said RECONCILED."""
    coordinator, silo = str(consortium_run["coordinator"]), str(consortium_run["silo"])
    extra = ["--out", str(tmp_path / "audit.html")] if command == "report" else []
    for logs, says in [((silo, coordinator), "is the log of mor://silo/hospital-a, not of a coordinator"),
                       ((coordinator, coordinator), "is the log of mor://coordinator/coordinator, not of a silo"),
                       ((coordinator, silo, silo), "are both logs of mor://silo/hospital-a")]:
        code = audit_main([command, *logs, "--ca", str(pki.ca.directory / "ca.pem"), *extra])
        captured = capsys.readouterr()
        assert code == 1 and says in captured.err and "RECONCILED" not in captured.out, (logs, captured)
        assert not (tmp_path / "audit.html").exists()


def test_verify_exits_1_naming_the_first_bad_entry_of_a_tampered_log(consortium_run, pki, capsys) -> None:
    with sqlite3.connect(consortium_run["silo"]) as connection:
        (body,) = connection.execute("SELECT body FROM entries WHERE seq = 2").fetchone()
        connection.execute("UPDATE entries SET body = ? WHERE seq = 2", (bytes(body).replace(b'"OK"', b'"KO"'),))
    code, out = cli("verify", str(consortium_run["silo"]), "--cert", str(pki.kits["hospital-a"].cert_path),
                    capsys=capsys)
    assert code == 1
    assert "FAILED" in out and "the first bad entry is entry 2" in out and "entry 2 was altered" in out


def test_a_forged_checkpoint_dated_beyond_any_calendar_is_reported_not_a_crash(consortium_run, pki, capsys,
                                                                               tmp_path: Path) -> None:
    """Write access and no key: a newest checkpoint with time 1e300 and a bad signature."""
    silo = read_log(consortium_run["silo"])
    forged = canonical_json({**json.loads(silo.checkpoints[-1].body), "time": 1e300})
    with sqlite3.connect(consortium_run["silo"]) as connection:
        connection.execute("INSERT INTO checkpoints(size, body, signature) VALUES (?, ?, ?)",
                           (len(silo.entries), forged, b"\x00" * 64))
    code, out = cli("verify", str(consortium_run["silo"]), "--cert", str(pki.kits["hospital-a"].cert_path),
                    capsys=capsys)
    assert code == 1 and "1e+300 (not a valid time)" in out and "the signature does not verify" in out
    code, out = cli("report", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), "--out", str(tmp_path / "audit.html"), capsys=capsys)
    assert code == 1 and "NOT INTACT" in out.upper() and "1e+300 (not a valid time)" in \
        (tmp_path / "audit.html").read_text(encoding="utf-8")


def test_an_entry_in_a_shape_the_log_never_writes_is_left_out_of_the_report(consortium_run, pki, capsys,
                                                                            tmp_path: Path, caplog) -> None:
    with sqlite3.connect(consortium_run["silo"]) as connection:
        (body,) = connection.execute("SELECT body FROM entries WHERE seq = 1").fetchone()
        edited = canonical_json({**json.loads(body), "privacy": "x", "round_id": ["r", 1]})
        connection.execute("UPDATE entries SET body = ? WHERE seq = 1", (edited,))
    code, out = cli("reconcile", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), capsys=capsys)
    assert code == 1 and "is not in mor://silo/hospital-a's log" in out  # the edited entry no longer matches
    out_file = tmp_path / "audit.html"
    code, out = cli("report", str(consortium_run["coordinator"]), str(consortium_run["silo"]),
                    "--ca", str(pki.ca.directory / "ca.pem"), "--out", str(out_file), capsys=capsys)
    assert code == 1 and "NOT INTACT" in out and out_file.is_file()  # written, and the exit says it is not intact
    page = out_file.read_text(encoding="utf-8")
    assert re.search(r'data-figure="queries:hospital-a"[^>]*>\s*3\s*<', page)  # the edited entry is left out
    assert re.search(r'data-figure="verification:mor://silo/hospital-a"[^>]*>\s*FAILED', page, re.I)
    assert "1 entries are not in the shape the log writes" in caplog.text



QUERY = "/mor_secure.proto.v1.SiloRewardService/Score"
# A DP-trained model's report, as a training with real noise writes it: what the served logs' silos serve.
PRIVATE_REPORT = PrivacyReport(dp_enabled=True, epsilon=4.0, delta=1e-5, noise_multiplier=1.1, sample_rate=0.2,
                               steps=10, epochs=2, max_grad_norm=1.0, accountant="prv", privacy_unit="image",
                               max_pairs_per_unit=None, noise=NOISE_OS_ENTROPY, private=True, mechanisms=())


def served_logs(tmp_path: Path, pki, *, silo_event: Callable[[str, int], dict] | None = None,
                ledgers: dict[str, Callable[[], LedgerSummary]] | None = None, calls: int = 3,
                refused: Callable[[int], bool] | None = None) -> dict[str, str]:
    """Both silos answer `calls` Score calls (call i refused where `refused(i)`; by default the last), as the silo's
    audit trail and the coordinator's client write them, one MoR round per call; `silo_event(silo, i)` overrides
    fields of a silo's own entry."""
    def ledger() -> LedgerSummary:
        return LedgerSummary(epsilon_budget=8.0, delta_budget=1e-5, epsilon_spent=1.0, delta_spent=1e-6, charges=1,
                             open_reservations=0, head_digest="00" * 32)

    silos = ("hospital-a", "bank-b")
    coordinator = AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"])
    trails = {s: SiloAuditTrail(AuditLog.for_kit(tmp_path / f"{s}.db", pki.kits[s], checkpoint_every_entries=1),
                                (ledgers or {}).get(s, ledger), served_report=PRIVATE_REPORT) for s in silos}
    for silo, trail in trails.items():
        trail.serving_started(silo=silo, policy=SiloPolicy(), policy_source="test", address="127.0.0.1:1")
    for i in range(calls):
        round_id, refusal = f"{i:032x}", refused(i) if refused else i == calls - 1
        for silo, trail in trails.items():
            call = {"event": "call", "rpc": QUERY, "round_id": round_id, "objective": "correct", "items": 2,
                    "request_digest": f"{i:02x}{silo}".ljust(64, "0"), "latency_ms": 1.0,
                    "status": "PERMISSION_DENIED" if refusal else "OK", "reason": "rate limit" if refusal else ""}
            own = silo_event(silo, i) if silo_event else {}
            trail.record({**call, "side": "server", "caller": "mor://coordinator/coordinator", "serial": "1",
                          "decision": "refused" if refusal else "admitted", **own})
            held = trail.latest_checkpoint()
            coordinator.record({**call, "side": "client", "callee": f"mor://silo/{silo}",
                                "peer_checkpoint": {"body": held.body.hex(), "signature": held.signature.hex()}})
        coordinator.record({"event": "round", "stage": "grpo", "method": "mor", "round_id": round_id,
                            "objective": "correct", "asked": list(silos), "answered": list(silos), "requests": {},
                            "items": 2, "items_digest": "00", "mean_weight": {s: {"shape": [0.5, 2]} for s in silos}})
    for trail in trails.values():
        trail.close()
    coordinator.close()
    return {"coordinator": str(tmp_path / "coordinator.db"), "ca": str(pki.ca.directory / "ca.pem"),
            **{silo: str(tmp_path / f"{silo}.db") for silo in silos}}


def report(logs: dict[str, str], *silos: str, capsys, tmp_path: Path) -> tuple[int, str, str]:
    """`mor audit report` on the coordinator's log and the named silos' logs: exit code, stdout, the page."""
    code, out = cli("report", logs["coordinator"], *(logs[s] for s in silos), "--ca", logs["ca"],
                    "--out", str(tmp_path / "audit.html"), capsys=capsys)
    return code, out, (tmp_path / "audit.html").read_text(encoding="utf-8")


def figure(page: str, name: str) -> str:
    found = re.search(rf'data-figure="{re.escape(name)}"[^>]*>\s*([^<]*?)\s*<', page)
    assert found, name
    return html.unescape(found.group(1))


def test_the_served_logs_are_intact(pki, capsys, tmp_path: Path) -> None:
    logs = served_logs(tmp_path, pki)
    code, out, page = report(logs, "hospital-a", "bank-b", capsys=capsys, tmp_path=tmp_path)
    assert code == 0 and figure(page, "verdict").startswith("INTACT"), figure(page, "verdict")
    assert figure(page, "refusals:bank-b") == "1"
    assert "The spend was made once, when the model was trained" in page


def test_the_page_counts_the_newest_entries_no_root_covers_yet_and_claims_no_root_over_them(pki, capsys,
                                                                                            tmp_path: Path) -> None:
    logs = served_logs(tmp_path, pki)
    running = AuditLog.for_kit(logs["coordinator"], pki.kits["coordinator"])  # still running: signs in 30 s
    try:
        for _ in range(2):
            running.record({"event": "call", "side": "client", "rpc": "/grpc.health.v1.Health/Check",
                            "callee": "mor://silo/hospital-a", "status": "OK"})
        code, _, page = report(logs, "hospital-a", "bank-b", capsys=capsys, tmp_path=tmp_path)
    finally:
        running.close()
    assert code == 0 and figure(page, "uncovered:mor://coordinator/coordinator") == "2"
    assert figure(page, "verdict").endswith("every signed root checks out; no root yet covers the newest 2 entries "
                                            "of mor://coordinator/coordinator.")


def test_a_silo_the_coordinator_called_whose_log_was_not_given_is_a_finding(pki, capsys, tmp_path: Path) -> None:
    logs = served_logs(tmp_path, pki)
    code, out = cli("reconcile", logs["coordinator"], logs["hospital-a"], "--ca", logs["ca"], capsys=capsys)
    assert code == 1 and "RECONCILED" in out
    assert ("mor://silo/bank-b: NO LOG GIVEN: the coordinator's log records 3 calls to it and 3 rounds that asked "
            "it; give its log to reconcile them") in out
    code, out, page = report(logs, "hospital-a", capsys=capsys, tmp_path=tmp_path)
    assert code == 1 and "NOT INTACT" in out
    assert "no log given of mor://silo/bank-b (the coordinator called it 3 times" in figure(page, "verdict")


def test_a_refusal_written_in_a_shape_the_log_never_writes_still_counts_and_is_a_finding(pki, capsys,
                                                                                        tmp_path: Path) -> None:
    """A silo with its own key writes its refusal with "items": "2 rows"; verify and reconcile cannot object."""
    logs = served_logs(tmp_path, pki, silo_event=lambda silo, i: {"items": "2 rows"} if (silo, i) == ("bank-b", 2)
                       else {})
    code, out, page = report(logs, "hospital-a", "bank-b", capsys=capsys, tmp_path=tmp_path)
    assert code == 1 and "NOT INTACT" in out
    assert figure(page, "refusals:bank-b") == "1" and figure(page, "queries:bank-b") == "3"
    assert "1 entry of mor://silo/bank-b is not in the shape the log writes" in figure(page, "verdict")
    assert figure(page, "misshapen:mor://silo/bank-b") == "1"


@pytest.mark.parametrize("when", [1e300, 1e12, "nan", -1.0], ids=["1e300", "year-33658", "nan-string", "before-1970"])
def test_an_entry_time_no_calendar_holds_is_a_finding_not_a_hang(pki, capsys, tmp_path: Path, when) -> None:
    logs = served_logs(tmp_path, pki, silo_event=lambda silo, i: {"time": when} if (silo, i) == ("bank-b", 1)
                       else {})
    code, out, page = report(logs, "hospital-a", "bank-b", capsys=capsys, tmp_path=tmp_path)
    assert code == 1 and "1 entry of mor://silo/bank-b is not in the shape the log writes (1 left out of the page)" \
        in figure(page, "verdict")
    assert figure(page, "queries:bank-b") == "2"


def test_the_buckets_of_the_queries_plot_are_capped_over_any_span(pki, capsys, tmp_path: Path) -> None:
    """Two calls 8,000 years apart (both times a calendar holds) once made a bucket per week: 400,000 of them."""
    logs = served_logs(tmp_path, pki, silo_event=lambda silo, i: {"time": 253_000_000_000.0} if (silo, i) ==
                       ("bank-b", 1) else {})
    code, _, page = report(logs, "hospital-a", "bank-b", capsys=capsys, tmp_path=tmp_path)
    days = int(re.search(r"counted per (\d+) days \(the last bucket", page).group(1))
    assert days >= 8000 * 365 // 31  # so the plot holds ~30 buckets


def test_a_budget_beyond_any_plot_and_a_round_naming_a_number_do_not_abort_the_report(pki, capsys,
                                                                                      tmp_path: Path) -> None:
    def vast() -> LedgerSummary:
        return LedgerSummary(epsilon_budget=1.7e308, delta_budget=1e-5, epsilon_spent=1.0, delta_spent=1e-6,
                             charges=1, open_reservations=0, head_digest="00" * 32)

    logs = served_logs(tmp_path, pki, ledgers={"bank-b": vast})

    def a_number_asked(entries: list[dict]) -> list[dict]:
        next(e for e in entries if e.get("event") == "round")["asked"] = ["hospital-a", 7]
        return entries

    rewrite(Path(logs["coordinator"]), pki.kits["coordinator"], a_number_asked)
    code, out, page = report(logs, "hospital-a", "bank-b", capsys=capsys, tmp_path=tmp_path)
    assert code == 1 and figure(page, "epsilon-budget:bank-b") == "1.7e+308"
    assert "1 entry of mor://coordinator/coordinator is not in the shape the log writes" in figure(page, "verdict")


def test_a_ledger_that_rises_while_the_silo_serves_is_stated_not_called_post_processing(pki, capsys, tmp_path: Path,
                                                                                        monkeypatch) -> None:
    monkeypatch.setattr(audit_trail, "LEDGER_REFRESH_SECONDS", 0.0)  # a fresh ledger read with every entry
    spends = iter([1.0, 1.0, 3.0, 5.0, 5.0, 5.0])

    def rising() -> LedgerSummary:
        return LedgerSummary(epsilon_budget=8.0, delta_budget=1e-5, epsilon_spent=next(spends, 5.0),
                             delta_spent=1e-6, charges=1, open_reservations=0, head_digest="00" * 32)

    logs = served_logs(tmp_path, pki, ledgers={"bank-b": rising}, calls=4)
    _, _, page = report(logs, "hospital-a", "bank-b", capsys=capsys, tmp_path=tmp_path)
    rose = figure(page, "budget-rise:bank-b")
    assert rose.startswith("bank-b's ledger rose from ε 1.00 to 5.00 after it began serving (")
    assert len(re.findall(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rose)) == 3  # the serving start, then each rise
    assert "For hospital-a: scores of a DP-trained model are post-processing" in page
    assert "For bank-b" not in page


@pytest.mark.parametrize(("decision", "misshapen"), [(["refused"], 1), ("REFUSED", 1), (None, 1), ("admitted", 0)],
                         ids=["list", "upper-case", "null", "admitted-but-refused-status"])
def test_a_refusal_whatever_its_decision_says_still_counts_as_one(pki, capsys, tmp_path: Path, decision,
                                                                  misshapen: int) -> None:
    """bank-b writes its refusal (PERMISSION_DENIED, "rate limit") with a decision in another shape, or "admitted":
    it is still a refusal, and a decision the log never writes is a finding."""
    logs = served_logs(tmp_path, pki, silo_event=lambda silo, i: {"decision": decision} if (silo, i) == ("bank-b", 2)
                       else {})
    code, out, page = report(logs, "hospital-a", "bank-b", capsys=capsys, tmp_path=tmp_path)
    assert figure(page, "refusals:bank-b") == "1" and figure(page, "misshapen:mor://silo/bank-b") == str(misshapen)
    assert (code, figure(page, "verdict").startswith("INTACT")) == ((1, False) if misshapen else (0, True)), out


def test_a_ledger_that_rises_between_refusals_before_any_answer_is_stated(pki, capsys, tmp_path: Path,
                                                                          monkeypatch) -> None:
    """bank-b refuses its first two calls and its ledger rises between them, before its first admitted query:
    serving began at its serving-start entry, so the rise is while it served."""
    monkeypatch.setattr(audit_trail, "LEDGER_REFRESH_SECONDS", 0.0)
    spends = iter([1.0, 1.0, 3.0])  # serving start, call 0, then 3.0 from call 1 on

    def rising() -> LedgerSummary:
        return LedgerSummary(epsilon_budget=8.0, delta_budget=1e-5, epsilon_spent=next(spends, 3.0),
                             delta_spent=1e-6, charges=1, open_reservations=0, head_digest="00" * 32)

    logs = served_logs(tmp_path, pki, ledgers={"bank-b": rising}, calls=4, refused=lambda i: i < 2)
    _, _, page = report(logs, "hospital-a", "bank-b", capsys=capsys, tmp_path=tmp_path)
    assert figure(page, "budget-rise:bank-b").startswith("bank-b's ledger rose from ε 1.00 to 3.00 after it began "
                                                         "serving (")
    assert "For hospital-a: scores of a DP-trained model are post-processing" in page and "For bank-b" not in page


def ledger_states(*states: tuple[float, int, int]) -> Callable[[], LedgerSummary]:
    """bank-b's ledger read by read, (epsilon spent, charges, open reservations), the last one repeated."""
    reads = iter(states)

    def read() -> LedgerSummary:
        spent, charges, open_reservations = next(reads, states[-1])
        return LedgerSummary(epsilon_budget=8.0, delta_budget=1e-5, epsilon_spent=spent, delta_spent=1e-6,
                             charges=charges, open_reservations=open_reservations, head_digest="00" * 32)
    return read


@pytest.mark.parametrize(("states", "fall"), [
    # A training reserves 4 while bank-b serves and settles for 2: the only way a ledger's total falls.
    (((1.0, 1, 0), (1.0, 1, 0), (5.0, 2, 1), (3.0, 2, 0)), None),
    # The newest charge removed from the ledger file (or the ledger replaced by an older copy).
    (((5.0, 2, 0), (5.0, 2, 0), (1.0, 1, 0)), "from ε 5.00 over 2 charges (0 open) to ε 1.00 over 1 (0 open)"),
    # The total cut with every charge still there and nothing settled: a recomputed chain.
    (((5.0, 2, 1), (5.0, 2, 1), (1.0, 2, 1)), "from ε 5.00 over 2 charges (1 open) to ε 1.00 over 2 (1 open)"),
], ids=["settled-for-less", "charge-removed", "total-cut"])
def test_a_ledger_that_goes_down_is_warned_of_unless_a_run_settled_for_less(pki, capsys, tmp_path: Path,
                                                                            monkeypatch, states, fall) -> None:
    monkeypatch.setattr(audit_trail, "LEDGER_REFRESH_SECONDS", 0.0)
    logs = served_logs(tmp_path, pki, ledgers={"bank-b": ledger_states(*states)}, calls=4)
    code, _, page = report(logs, "hospital-a", "bank-b", capsys=capsys, tmp_path=tmp_path)
    how = "rose from ε 1.00 to 3.00" if fall is None else "went down from ε 5.00 to 1.00"
    assert figure(page, "budget-rise:bank-b").startswith(f"bank-b's ledger {how} after it began serving (")
    assert "For bank-b" not in page and 'data-figure="budget-fall:hospital-a"' not in page
    if fall is None:
        assert 'data-figure="budget-fall:' not in page
    else:
        warning = figure(page, "budget-fall:bank-b")
        assert warning.startswith("WARNING: bank-b's ledger went down in a way a ledger cannot: at ")
        assert fall in warning
        assert warning.endswith("the most this log shows it spent is ε 5.00.")
    assert code == 0 and figure(page, "verdict").startswith("INTACT")  # a finding about privacy, not the record


TRAINED_SILO_YAML = """\
name: hospital-a
consortium: {consortium}
workdir: {workdir}
architecture: small_cnn
public_pretraining_steps: 5
training:
  epochs: 2
  batch_size: 16
  learning_rate: 0.005
  dp:
    enabled: {dp}
    target_epsilon: 4.0
    target_delta: 1.0e-5
    accountant: prv
{noise}
privacy_budget:
  epsilon: 10.0
  delta: 2.0e-5
serve:
  kit: {kit}
  crl: {crl}
  port: 0
"""


@pytest.mark.parametrize(("trainings", "private", "why"), [
    (["dp"], True, audit_trail.POST_PROCESSING),
    (["pair"], True, audit_trail.POST_PROCESSING),
    (["seeded"], False, "its DP-SGD noise was 'seeded: not private'"),
    (["dp", "dp-off"], False, "trained without DP"),
], ids=["dp", "dp-per-pair", "seeded-noise", "dp-off-retrain"])
def test_a_served_model_is_logged_and_reported_as_private_only_if_its_privacy_report_says_so(
        pki, consortium_path: Path, tmp_path: Path, capsys, trainings: list[str], private: bool, why: str) -> None:
    """Real trainings, a real silo server, its log and the coordinator's, the reviewer's page. Scores are
    post-processing only of a private model: one trained with seeded noise, or retrained with DP off in a workdir
    that has a ledger (served under the DP config, so its ledger stays flat while it serves), once had every call
    logged, and the page say, "scores of a DP-trained model are post-processing". The page says what one unit of
    a private model's epsilon is, and warns of a per-pair one (it read exactly like a per-patient one)."""
    configs = {}
    for kind, dp, noise in (("dp", "true", ""), ("pair", "true", "    privacy_unit: pair"),
                            ("seeded", "true", "    insecure_seeded_noise: 7"), ("dp-off", "false", "")):
        configs[kind] = tmp_path / f"{kind}.yaml"
        configs[kind].write_text(TRAINED_SILO_YAML.format(
            consortium=consortium_path, workdir=tmp_path / "work", dp=dp, noise=noise,
            kit=pki.kits["hospital-a"].directory, crl=pki.crl), encoding="utf-8")
    assert mor_main(["silo", "init", "--config", str(configs["dp"])]) == 0
    for kind in trainings:
        assert mor_main(["silo", "train", "--config", str(configs[kind]), "--no-progress"]) == 0
    config = load_silo_config(configs["dp"])
    running, trail, rounds = start_silo_server(config)
    coordinator_log = AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"])
    client = NetworkSiloClient("hospital-a", f"127.0.0.1:{running.port}", pki.kits["coordinator"], retries=0,
                               audit=coordinator_log)
    try:
        assert len(client.score(GOOD).scores) == 2
    finally:
        client.close()
        running.stop(0)
        trail.serving_stopped(silo="hospital-a")
        trail.close()
        rounds.close()
        coordinator_log.close()

    entries = [e.fields() for e in read_log(audit_log_path(config)).entries]
    (started,) = [e for e in entries if e["event"] == "serving_started"]
    (score,) = [e for e in entries if e.get("rpc") == QUERY]
    assert why in started["model_privacy"]["why"] and started["model_privacy"]["private"] is private
    assert (score["privacy"]["why"], score["privacy"]["model_private"]) == (started["model_privacy"]["why"], private)
    unit = "pair" if trainings == ["pair"] else "image"  # the benchmark partition's unit is the image
    assert started["model_privacy"].get("unit") == (unit if private else None)
    if not private:
        assert "NOT differentially private" in score["privacy"]["why"] and "post-processing" not in json.dumps(entries)

    capsys.readouterr()
    code, out = cli("report", str(tmp_path / "coordinator.db"), str(audit_log_path(config)),
                    "--ca", str(pki.ca.directory / "ca.pem"), "--out", str(tmp_path / "audit.html"), capsys=capsys)
    page = (tmp_path / "audit.html").read_text(encoding="utf-8")
    assert code == 0 and figure(page, "verdict").startswith("INTACT"), out
    claimed = "For hospital-a: scores of a DP-trained model are post-processing" in page
    assert (claimed, "The spend was made once, when the model was trained" in page) == (private, private)
    assert figure(page, "epsilon-unit:hospital-a") == (unit if private else "no private model on record")
    if unit == "pair":
        assert figure(page, "per-pair:hospital-a").startswith(
            "WARNING: the model hospital-a served (serving start at ") and "has no stated guarantee" in page
    else:
        assert 'data-figure="per-pair:' not in page
    if private:
        assert 'data-figure="model-not-private:' not in page
    else:
        warning = figure(page, "model-not-private:hospital-a")
        assert warning.startswith("WARNING: the model hospital-a served is not shown to be differentially private: "
                                  "its answers carry no DP guarantee") and why in warning
        assert "the served model is NOT differentially private (" in warning
        assert 'class="bad">WARNING' in page  # in the page's style for problems
