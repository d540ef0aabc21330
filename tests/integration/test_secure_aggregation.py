"""Secure aggregation end to end: the real silo side (SecureRounds, in process and behind mTLS) and SecureFusion.

Real TenSEAL, real masks and keys from `mor pki init`; the reward model is a
fake (these tests are about the protocol around it).
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from crafted_vectors import redeclared
from grpc_health.v1 import health_pb2, health_pb2_grpc
from silo_fakes import RightAnswerModel, png

from coordinator.fusion import ClearFusion, FusionItems, RoundFailedError
from coordinator.secure_fusion import SecureFusion
from coordinator.silo_requests import ROWS_PER_REQUEST
from cryptography.hazmat.primitives import serialization
from mor_cli.pki_cli import init_pki
from mor_secure.pki.identity import PartyIdentity, Role
from mor_secure.pki.kits import CertKit
from mor_secure.secagg import aggregation
from mor_secure.secagg.agreement import new_agreement_key
from mor_secure.secagg.fixed_point import decode
from mor_secure.secagg.provisioning import coordinator_context
from mor_secure.transport.credentials import channel_credentials
from mor_secure.transport.revocation import RevocationList
from mor_secure.wire import ErrorCode, ImageBlob, ScoreRow, SiloError
from mor_secure.wire.messages import DecryptRequest, Participant, ScoreRequest, SecureScoreRequest
from silo_agent.in_process import InProcessSiloClient
from silo_agent.secure_rounds import RoundRecord, SecureRounds
from silo_agent.service import SiloService

SILOS = ("hospital-a", "bank-b", "hospital-c")


class ScaledModel(RightAnswerModel):
    """A different (known) score per silo, so a sum that mixed them up would show."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def side_inputs(self, images, prompts, responses):
        (raw,) = super().side_inputs(images, prompts, responses)
        return (raw * self.scale,)


# Other certificates of bank-b, each issued by the consortium CA but not to be masked against.
BAD_BANK_B_CERTIFICATES = ("revoked", "expired", "not yet valid")


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory, consortium_path: Path) -> dict[str, CertKit]:
    root = tmp_path_factory.mktemp("secure-pki")
    authority, _ = init_pki(consortium_path, root, days=2)
    kits = {name: CertKit.load(root / "kits" / f"silo-{name}") for name in SILOS} | {
        "coordinator": CertKit.load(root / "kits" / "coordinator-coordinator")}
    bank_b, now = PartyIdentity(Role.SILO, "bank-b"), dt.datetime.now(dt.timezone.utc)
    kits["bank-b revoked"] = authority.issue(bank_b, root / "bank-b-revoked")
    kits["bank-b expired"] = authority.issue(bank_b, root / "bank-b-expired", lifetime=dt.timedelta(days=1),
                                             not_before=now - dt.timedelta(days=3))
    kits["bank-b not yet valid"] = authority.issue(bank_b, root / "bank-b-future", lifetime=dt.timedelta(days=1),
                                                   not_before=now + dt.timedelta(days=1))
    authority.revoke(serial=kits["bank-b revoked"].certificate().serial_number, reason="keyCompromise")
    for name in SILOS:  # the re-signed CRL, distributed to the silos as an operator would
        shutil.copyfile(authority.directory / "crl.pem", kits[name].crl_path)
    return kits


def secure_rounds(service: SiloService, kit: CertKit, record: Path, *, minimum: int = 2) -> SecureRounds:
    """A silo's secure rounds as `mor silo serve` builds them: its CRL, its durable record of round ids."""
    return SecureRounds(service, kit, minimum_participants=minimum,
                        revocations=RevocationList(kit.crl_path, kit.ca_certificate()), rounds=RoundRecord(record))


def clients(kits, workdir: Path | None, *, minimum: int = 2) -> list[InProcessSiloClient]:
    """The three silos in process; with no `workdir` (and so no round records), for clear rounds only."""
    out = []
    for k, name in enumerate(SILOS):
        service = SiloService(name, ScaledModel(1.0 + k))
        out.append(InProcessSiloClient(service, secure=None if workdir is None else secure_rounds(
            service, kits[name], workdir / f"{name}.jsonl", minimum=minimum)))
    return out


@pytest.fixture
def items(tmp_path: Path) -> FusionItems:
    image = tmp_path / "a.png"
    image.write_bytes(png())
    return FusionItems(images=(image,) * 4, prompts=("q",) * 4, responses=("right", "wrong", "right", "other"))


def test_the_secure_fused_reward_equals_the_clear_one(kits, items, tmp_path: Path) -> None:
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    secure = SecureFusion(clients(kits, tmp_path), coordinator_context(kits["coordinator"])).fuse(items, weights)
    clear = ClearFusion(clients(kits, None)).fuse(items, weights)
    assert torch.allclose(secure, clear, atol=1e-4), (secure, clear)


class Down(InProcessSiloClient):
    def secure_score(self, request):
        raise SiloError(ErrorCode.UNAVAILABLE, f"silo {self.name!r}: connection refused")


def test_a_silo_that_fails_makes_the_round_restart_with_the_others(kits, items, tmp_path: Path) -> None:
    silos = clients(kits, tmp_path)
    silos[2] = Down(silos[2].service, secure=silos[2].secure)
    weights = torch.full((4, 3), 1 / 3)
    fusion = SecureFusion(silos, coordinator_context(kits["coordinator"]), minimum_participants=2)
    expected = ClearFusion(clients(kits, None)[:2]).fuse(items, torch.full((4, 2), 0.5))
    assert torch.allclose(fusion.fuse(items, weights), expected, atol=1e-4)
    assert fusion.last_round == {"hospital-a": True, "bank-b": True, "hospital-c": False}
    with pytest.raises(RoundFailedError, match="fewer than the consortium's minimum of 3"):
        SecureFusion(silos, coordinator_context(kits["coordinator"])).fuse(items, weights)


def test_a_row_whose_weight_was_on_a_lost_silo_is_in_one_decrypted_sum_only(kits, pki, tmp_path: Path) -> None:
    """A row with its weight on the silo that failed gets the present silos' plain average. Asked of them again
    in a second round (as the clear fusion does), it was in two decrypted sums over the same two silos under two
    known weightings: the coordinator solved both silos' scores to 1e-3."""
    from mor_secure.audit import AuditLog, read_log

    decrypted_over: list[tuple[str, ...]] = []

    class Witnessed(InProcessSiloClient):
        def decrypt(self, request):
            decrypted_over.append(tuple(request.participants))
            return super().decrypt(request)

    class WitnessedDown(Witnessed, Down):
        pass

    silos = [(WitnessedDown if c.name == "hospital-c" else Witnessed)(c.service, secure=c.secure)
             for c in clients(kits, tmp_path)]
    image = tmp_path / "a.png"
    image.write_bytes(png())
    items = FusionItems(images=(image,) * 4, prompts=("q0", "q1", "q2", "q3"),
                        responses=("right", "wrong", "right", "other"), kinds=("color", "shape", "color", "shape"))
    # Rows 0 and 1: under 2^-7 of their weight on the silos that answer (orphans); rows 2 and 3 renormalised.
    weights = torch.tensor([[0.002, 0.003, 0.995], [0.004, 0.001, 0.995], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])
    log = AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"])
    try:
        fusion = SecureFusion(silos, coordinator_context(kits["coordinator"]), minimum_participants=2, audit=log)
        fused = fusion.fuse(items, weights)
    finally:
        log.close()
    assert decrypted_over == [("hospital-a", "bank-b")]  # every row in one decrypted sum
    equal_then_renormalised = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.4, 0.6], [0.4, 0.6]])
    expected = ClearFusion(clients(kits, None)[:2]).fuse(items, equal_then_renormalised)
    assert torch.allclose(fused, expected, atol=1e-4), (fused, expected)
    first, restart = [e.fields() for e in read_log(log.path).entries if e.fields().get("event") == "round"]
    assert first["answered"] == restart["asked"] == ["hospital-a", "bank-b"]
    # The router's weights are on record once, for the rows they scored: not in the abandoned first attempt (its
    # rows are all in the restart; the report counted rows 2 and 3 twice), nor for the orphans, sent equal weights.
    assert "mean_weight" not in first
    assert restart["mean_weight"] == {"hospital-a": {"color": [0.2, 1], "shape": [0.2, 1]},
                                      "bank-b": {"color": [0.3, 1], "shape": [0.3, 1]}}


@pytest.mark.parametrize(("answer", "error"), [
    # An empty answer used to fail the round with an IndexError before it was recorded (and as a traceback).
    (lambda ciphertexts: (), "answered 0 ciphertexts, not one"),
    # A vector declaring more items than its rows: adding it to the others, then the blinding, read past it.
    (lambda ciphertexts: (redeclared(ciphertexts[0], [100_000]),),
     r"answered a ciphertext that is not the round's: 1 ciphertext\(s\) declaring 100000 items, not one "
     "ciphertext of 3 items"),
], ids=["no ciphertext", "over-declared"])
def test_a_secure_round_a_silo_answers_without_its_ciphertext_fails_on_the_record(kits, items, pki, tmp_path: Path,
                                                                                  answer, error) -> None:
    from mor_secure.audit import AuditLog, read_log
    from mor_secure.wire.messages import SecureScoreReply

    class Malformed(InProcessSiloClient):
        def secure_score(self, request):
            return SecureScoreReply(ciphertexts=answer(super().secure_score(request).ciphertexts))

    silos = clients(kits, tmp_path)
    silos[1] = Malformed(silos[1].service, secure=silos[1].secure)
    log = AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"])
    try:
        with pytest.raises(SiloError, match=f"silo 'bank-b' {error}") as failed:
            SecureFusion(silos, coordinator_context(kits["coordinator"]), audit=log).fuse(items,
                                                                                         torch.full((4, 3), 1 / 3))
        assert failed.value.code == ErrorCode.INTERNAL
    finally:
        log.close()
    (entry,) = [e.fields() for e in read_log(log.path).entries if e.fields().get("event") == "round"]
    assert (entry["asked"], entry["answered"]) == (list(SILOS), ["hospital-a", "hospital-c"])


def test_a_silo_lost_in_a_later_chunk_leaves_no_decrypted_sum_that_included_it(kits, tmp_path: Path) -> None:
    """Over ROWS_PER_REQUEST rows a fuse is several rounds: chunk 1's sum decrypted with hospital-c, then again
    without it after it dropped out of chunk 2, would hand the coordinator hospital-c's terms (the difference)."""
    decrypted_over: list[tuple[str, ...]] = []

    class Witnessed(InProcessSiloClient):
        def decrypt(self, request):
            decrypted_over.append(tuple(request.participants))
            return super().decrypt(request)

    class LostAfterItsFirstAnswer(Witnessed):
        answered = False

        def secure_score(self, request):
            if self.answered:
                raise SiloError(ErrorCode.UNAVAILABLE, f"silo {self.name!r}: connection reset")
            self.answered = True
            return super().secure_score(request)

    silos = [(LostAfterItsFirstAnswer if c.name == "hospital-c" else Witnessed)(c.service, secure=c.secure)
             for c in clients(kits, tmp_path)]
    image = tmp_path / "a.png"
    image.write_bytes(png())
    rows = ROWS_PER_REQUEST + 88  # two chunks; distinct prompts, so no row is folded into another
    items = FusionItems(images=(image,) * rows, prompts=tuple(f"q{i}" for i in range(rows)),
                        responses=tuple("right" if i % 3 else "wrong" for i in range(rows)))
    fusion = SecureFusion(silos, coordinator_context(kits["coordinator"]), minimum_participants=2)
    fused = fusion.fuse(items, torch.full((rows, 3), 1 / 3))
    assert decrypted_over == [("hospital-a", "bank-b")] * 2  # one decryption per chunk, none with hospital-c
    expected = ClearFusion(clients(kits, None)[:2]).fuse(items, torch.full((rows, 2), 0.5))
    assert torch.allclose(fused, expected, atol=1e-4)
    assert fusion.last_round == {"hospital-a": True, "bank-b": True, "hospital-c": False}


class Witnessed(InProcessSiloClient):
    """A silo that counts the decryptions it makes and can be switched off (UNAVAILABLE) by the test."""

    decrypted_over: list[tuple[str, ...]] = []
    down: set[str] = set()

    def secure_score(self, request):
        if self.name in self.down:
            raise SiloError(ErrorCode.UNAVAILABLE, f"silo {self.name!r}: connection refused")
        return super().secure_score(request)

    def decrypt(self, request):
        self.decrypted_over.append(tuple(request.participants))
        return super().decrypt(request)


def witnessed(kits, tmp_path: Path) -> list[Witnessed]:
    Witnessed.decrypted_over, Witnessed.down = [], set()
    return [Witnessed(c.service, secure=c.secure) for c in clients(kits, tmp_path)]


def distinct_items(tmp_path: Path, rows: int) -> FusionItems:
    image = tmp_path / "a.png"
    image.write_bytes(png())
    return FusionItems(images=(image,) * rows, prompts=tuple(f"q{i}" for i in range(rows)),
                       responses=tuple("right" if i % 3 else "wrong" for i in range(rows)))


def test_a_row_fused_again_while_a_silo_is_down_is_answered_from_the_record_not_decrypted_again(
        kits, tmp_path: Path) -> None:
    """GRPO fuses the same rows in many steps under the same router weights. Decrypted over {A, B, C} in one step
    and over {A, B} in the next, after C dropped out, the two fused rewards gave C's scores exactly (found by a
    review probe: S1 - f2 (w_A + w_B) = w_C r_C). Now the second fuse asks nobody."""
    silos = witnessed(kits, tmp_path)
    items = distinct_items(tmp_path, 6)
    weights = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    fusion = SecureFusion(silos, coordinator_context(kits["coordinator"]), minimum_participants=2)
    first = fusion.fuse(items, weights)
    Witnessed.down = {"hospital-c"}
    again = fusion.fuse(items, weights)
    assert torch.equal(again, first) and fusion.last_round == {}
    # The router's weights for a row, computed in another batch, differ in their last bits: the same weighting.
    assert torch.equal(fusion.fuse(items, weights + 1e-7), first)
    assert Witnessed.decrypted_over == [tuple(SILOS)]  # one decryption, over all three
    # A new row in the same fuse is still decrypted, over the silos present, and the known ones are not.
    more = distinct_items(tmp_path, 7)
    fused = fusion.fuse(more, torch.cat([weights, torch.full((1, 3), 1 / 3)]))
    assert torch.equal(fused[:6], first) and Witnessed.decrypted_over[1:] == [("hospital-a", "bank-b")]
    expected = ClearFusion(clients(kits, None)[:2]).fuse(
        FusionItems(images=more.images[6:], prompts=more.prompts[6:], responses=more.responses[6:]),
        torch.full((1, 2), 0.5))
    assert torch.allclose(fused[6:], expected, atol=1e-4)


def test_no_sum_is_decrypted_that_with_a_rows_earlier_sums_determines_a_silos_score(kits, tmp_path: Path) -> None:
    """An evaluation fuses its test pairs under every method and seed; the pool's fusions share one record, so
    the third generic weighting of a row over three silos (a linear system the coordinator could solve for every
    silo's score: 2e-5 in a review probe) is refused before anything is decrypted. Two are allowed."""
    from coordinator.decrypted_rows import DecryptedRows, RevealingSumError

    silos = witnessed(kits, tmp_path)
    items = distinct_items(tmp_path, 5)
    record = DecryptedRows(SILOS, tmp_path / "decrypted-rows.db")
    context = coordinator_context(kits["coordinator"])
    uniform = torch.full((5, 3), 1 / 3)
    router = torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    other_router = torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(2)), dim=1)
    SecureFusion(silos, context, decrypted=record).fuse(items, uniform)
    SecureFusion(silos, context, decrypted=record).fuse(items, router)
    assert len(Witnessed.decrypted_over) == 2
    with pytest.raises(RevealingSumError, match="would determine the score of silo 'bank-b'"):
        SecureFusion(silos, context, decrypted=record).fuse(items, other_router)
    assert len(Witnessed.decrypted_over) == 2  # refused before the decryption
    # The record is on disk: a coordinator restarted with it refuses the same, in any column order.
    record.close()
    reordered = [silos[2], silos[0], silos[1]]
    with pytest.raises(RevealingSumError):
        SecureFusion(reordered, context, decrypted=DecryptedRows(SILOS, tmp_path / "decrypted-rows.db")).fuse(
            items, other_router[:, [2, 0, 1]])
    # A row fused under uniform weights over {A, B, C} and then, with C down, over {A, B} in a fusion of its own
    # (not the same weights, so not answered from the record): 3 x first - 2 x second is C's score.
    (tmp_path / "fresh").mkdir()
    fresh = distinct_items(tmp_path / "fresh", 1)
    shared = DecryptedRows(SILOS)
    SecureFusion(silos, context, decrypted=shared).fuse(fresh, torch.full((1, 3), 1 / 3))
    Witnessed.down = {"hospital-c"}
    with pytest.raises(RevealingSumError, match="would determine the score of silo 'hospital-c'"):
        SecureFusion(silos, context, decrypted=shared, minimum_participants=2).fuse(
            fresh, torch.tensor([[0.5, 0.5, 0.0]]))


def test_a_round_whose_sums_are_never_decrypted_puts_no_router_weight_on_record(kits, pki, tmp_path: Path) -> None:
    """The page's mean router weight is over the rows those weights formed a reward for. A weighting refused as
    revealing was asked of every silo first and its round logged with the router's weights (the docs review's
    page read 0.50 n=4 where 3 rows got a reward, at 0.467); so was a round that no participant could decrypt."""
    from coordinator.decrypted_rows import DecryptedRows, RevealingSumError
    from mor_secure.audit import AuditLog, read_log

    asked: list[str] = []

    class Counted(Witnessed):
        def secure_score(self, request):
            asked.append(self.name)
            return super().secure_score(request)

    Witnessed.decrypted_over, Witnessed.down = [], set()
    silos = [Counted(c.service, secure=c.secure) for c in clients(kits, tmp_path)]
    items = replace(distinct_items(tmp_path, 5), kinds=("color",) * 5)
    generator = torch.Generator().manual_seed(1)
    routers = [torch.full((5, 3), 1 / 3), *(torch.softmax(torch.randn(5, 3, generator=generator), dim=1)
                                             for _ in range(2))]
    record, context = DecryptedRows(SILOS), coordinator_context(kits["coordinator"])
    log = AuditLog.for_kit(tmp_path / "coordinator.db", pki.kits["coordinator"])
    try:
        for router in routers[:2]:
            SecureFusion(silos, context, decrypted=record, audit=log, method="mor").fuse(items, router)
        asked.clear()
        with pytest.raises(RevealingSumError):
            SecureFusion(silos, context, decrypted=record, audit=log, method="mor").fuse(items, routers[2])
        assert asked == []  # refused before a silo computed anything

        class Undecryptable(Counted):
            def decrypt(self, request):
                raise SiloError(ErrorCode.UNAVAILABLE, f"silo {self.name!r}: connection refused")

        lost = [Undecryptable(c.service, secure=c.secure) for c in silos]
        with pytest.raises(RoundFailedError, match="could decrypt it"):  # a record of its own: nothing decrypted
            SecureFusion(lost, context, audit=log, method="mor").fuse(items, routers[0])
    finally:
        log.close()
    rounds = [e.fields() for e in read_log(log.path).entries if e.fields().get("event") == "round"]
    assert len(rounds) == 3  # the two decrypted fusions and the undecryptable one; the refused one asked nobody
    assert all("mean_weight" in r for r in rounds[:2]) and "mean_weight" not in rounds[2]
    assert rounds[2]["answered"] == list(SILOS)  # on record as answered, but it formed no reward


def request(silos, round_id: str, weights=(0.5,)) -> SecureScoreRequest:
    """One row ("right": score 1 at hospital-a) for every silo in `silos`, as the coordinator would relay them."""
    score = ScoreRequest(images=(ImageBlob.of(png()),), rows=(ScoreRow(0, "q", "right"),), round_id=round_id,
                         objective="correct", weights=weights)
    participants = tuple(Participant(name=c.name, agreement_key=c.agreement_key().agreement_key,
                                     certificate_pem=c.agreement_key().certificate_pem) for c in silos)
    return SecureScoreRequest(score=score, participants=participants)


@pytest.fixture(params=["in_process", "grpc"])
def silos(request, kits, tmp_path: Path):
    """The three silos, in process or each behind its own mTLS server (same refusals, same statuses)."""
    local = clients(kits, tmp_path)
    if request.param == "in_process":
        yield local
        return
    from mor_secure.policy import SiloAdmission, SiloPolicy
    from mor_secure.transport.server import serve

    from coordinator.network_client import NetworkSiloClient
    from silo_agent.servicer import ROLES_BY_RPC, servicer_registration

    servers, remote = [], []
    for client in local:
        kit = kits[client.name]
        running = serve(kit=kit, crl_path=kit.crl_path, roles_by_rpc=ROLES_BY_RPC, admission=SiloAdmission(SiloPolicy()),
                        services=[servicer_registration(client.service, secure=client.secure)])
        running.set_serving(True)
        servers.append(running)
        remote.append(NetworkSiloClient(client.name, f"127.0.0.1:{running.port}", kits["coordinator"], retries=0))
        remote[-1].secure = client.secure  # the tests peek at the silo's context through it
    yield remote
    for client, running in zip(remote, servers, strict=True):
        client.close()
        running.stop(0)


def refused(call, code: ErrorCode, match: str) -> None:
    with pytest.raises(SiloError, match=match) as caught:
        call()
    assert caught.value.code == code


def test_one_silos_ciphertext_is_noise_and_rounds_are_answered_and_decrypted_once(silos, kits) -> None:
    good = request(silos, "round-x")
    (ciphertext,) = silos[0].secure_score(good).ciphertexts
    # Even decrypted with the secret context, one silo's contribution is masked (its score times 0.5 is 0.5).
    assert abs(decode(aggregation.decrypt(ciphertext, silos[1].secure._context))[0] - 0.5) > 1e-3
    refused(lambda: silos[0].secure_score(good), ErrorCode.FAILED_PRECONDITION, "was already answered")
    names = tuple(p.name for p in good.participants)
    decrypt = DecryptRequest(round_id="round-x", participants=names, ciphertexts=(ciphertext,))
    silos[0].decrypt(decrypt)
    refused(lambda: silos[0].decrypt(decrypt), ErrorCode.FAILED_PRECONDITION, "was already decrypted")
    refused(lambda: silos[1].decrypt(decrypt), ErrorCode.FAILED_PRECONDITION, "took no part in round")
    # Refused before anything is decrypted: a replay, or a round the silo is not in, costs it no BFV decryption.
    garbage = replace(decrypt, ciphertexts=(b"not a ciphertext",))
    refused(lambda: silos[0].decrypt(garbage), ErrorCode.FAILED_PRECONDITION, "was already decrypted")
    refused(lambda: silos[1].decrypt(garbage), ErrorCode.FAILED_PRECONDITION, "took no part in round")
    # And the silos still serve: a new round is answered and decrypted.
    fresh = request(silos, "round-y")
    (answer,) = silos[0].secure_score(fresh).ciphertexts
    (values,) = silos[0].decrypt(replace(decrypt, round_id="round-y", ciphertexts=(answer,))).values
    assert len(values) > 0


def test_a_deeply_nested_agreement_key_is_refused_like_any_malformed_one(silos, kits) -> None:
    """A key-agreement key far longer than a signed key can be is refused before parsing (nested JSON that deep
    made `json` raise RecursionError, answered INTERNAL)."""
    good = request(silos, "nested-key")
    nested = replace(good.participants[1], agreement_key="[" * 100_000 + "]" * 100_000)
    refused(lambda: silos[0].secure_score(replace(good, participants=(good.participants[0], nested,
                                                                     good.participants[2]))),
            ErrorCode.PERMISSION_DENIED, "participant 'bank-b': its signed key is 200000 characters long")
    assert len(silos[0].secure_score(request(silos, "after-nested-key")).ciphertexts) == 1  # and it still serves


def test_a_refusal_quoting_long_participant_names_is_answered_with_its_own_status(silos, kits) -> None:
    """The refusal names the round's participants; over gRPC, details past its 16 KiB metadata limit reached the
    coordinator as RESOURCE_EXHAUSTED (a rate limit, to it) while the silo recorded INVALID_ARGUMENT."""
    good = request(silos, "long-names")
    strangers = tuple(replace(good.participants[1], name=f"{k}-" + "x" * 4000) for k in range(6))
    refused(lambda: silos[0].secure_score(replace(good, participants=good.participants[1:] + strangers)),
            ErrorCode.INVALID_ARGUMENT, "is not among the round's participants")
    assert len(silos[0].secure_score(good).ciphertexts) == 1  # and it still serves


@pytest.mark.parametrize("name", ["Bank-B", "", "bank b"])
def test_a_participant_named_as_no_party_can_be_is_refused_not_failed(silos, kits, name: str) -> None:
    """bank-b's certificate and signed key under a name no party can have: it was a ValueError in the silo, answered
    INTERNAL and logged as a bug of the silo's."""
    good = request(silos, f"misnamed-{name}")
    misnamed = replace(good.participants[1], name=name)
    refused(lambda: silos[0].secure_score(replace(good, participants=(good.participants[0], misnamed,
                                                                     good.participants[2]))),
            ErrorCode.PERMISSION_DENIED, f"participant {name!r} came with the certificate of mor://silo/bank-b")
    assert len(silos[0].secure_score(good).ciphertexts) == 1  # and it still serves


def test_a_round_below_the_minimum_a_weight_over_the_cap_and_a_swapped_key_are_refused(silos, kits) -> None:
    alone = replace(request(silos, "r1"), participants=request(silos, "r1").participants[:1])
    refused(lambda: silos[0].secure_score(alone), ErrorCode.FAILED_PRECONDITION, "needs at least 2 participants")
    refused(lambda: silos[0].secure_score(request(silos, "r2", weights=(1.5,))), ErrorCode.PERMISSION_DENIED,
            "weight of at most 1")
    # A refused round is not one the silo took part in: it decrypts nothing for it (it used to decrypt whatever
    # ciphertext came, the round id having been recorded before the weights were checked).
    (elsewhere,) = silos[1].secure_score(request(silos, "r2-elsewhere")).ciphertexts
    refused(lambda: silos[0].decrypt(DecryptRequest(round_id="r2", participants=tuple(p.name for p in alone.participants)
                                                    + ("bank-b",), ciphertexts=(elsewhere,))),
            ErrorCode.FAILED_PRECONDITION, "took no part in round 'r2'")
    good = request(silos, "r3")
    other = good.participants[2]
    swapped = replace(good.participants[1], agreement_key=other.agreement_key)  # bank-b's slot, hospital-c's key
    refused(lambda: silos[0].secure_score(replace(good, participants=(good.participants[0], swapped, other))),
            ErrorCode.PERMISSION_DENIED, "claims to be mor://silo/hospital-c's")
    with pytest.raises(ValueError, match="must be the public one"):
        SecureFusion(silos, silos[0].secure._context)
    assert len(silos[0].secure_score(request(silos, "r4")).ciphertexts) == 1  # and it still serves


def test_a_decrypt_of_other_than_one_valid_ciphertext_is_refused_and_the_round_keeps_its_decryption(
        silos, kits) -> None:
    good = request(silos, "round-d")
    ciphertexts = [silo.secure_score(good).ciphertexts[0] for silo in silos]
    decrypt = DecryptRequest(round_id="round-d", participants=tuple(p.name for p in good.participants),
                             ciphertexts=())
    refused(lambda: silos[0].decrypt(decrypt), ErrorCode.INVALID_ARGUMENT, "carries one ciphertext.*this one has 0")
    refused(lambda: silos[0].decrypt(replace(decrypt, ciphertexts=tuple(ciphertexts[:2]))),
            ErrorCode.INVALID_ARGUMENT, "this one has 2")
    refused(lambda: silos[0].decrypt(replace(decrypt, ciphertexts=(b"not a ciphertext",))),
            ErrorCode.INVALID_ARGUMENT, "is not a BFV vector of this consortium's context: failed to parse")
    # A real ciphertext declaring more items than its 8192 slots: TenSEAL would answer that many values, the
    # silo's heap past the slots (and crash the silo at 10^6).
    refused(lambda: silos[0].decrypt(replace(decrypt, ciphertexts=(redeclared(ciphertexts[0], [100_000]),))),
            ErrorCode.INVALID_ARGUMENT, r"1 ciphertext\(s\) declaring 100000 items, not one ciphertext of 1 to 8192")
    # None of those used up the round's one decryption: the sum decrypts, 0.5 * (1 + 3 + 5) (scores 1, 3, 5).
    public = coordinator_context(kits["coordinator"])
    total = aggregation.add([aggregation.vector(c, public) for c in ciphertexts]).serialize()
    (values,) = silos[0].decrypt(replace(decrypt, ciphertexts=(total,))).values
    assert abs(decode(np.asarray(values[:1]))[0] - 4.5) < 1e-4
    refused(lambda: silos[0].decrypt(replace(decrypt, ciphertexts=(total,))), ErrorCode.FAILED_PRECONDITION,
            "was already decrypted")


def test_a_round_of_more_silos_than_the_fixed_point_range_sums_is_refused(silos, kits) -> None:
    """17 silos' terms at the extremes would wrap around mod t; the silo refuses the round, the coordinator the
    consortium."""
    good = request(silos, "r-17")
    many = good.participants + tuple(replace(good.participants[1], name=f"silo-{k}") for k in range(14))
    refused(lambda: silos[0].secure_score(replace(good, participants=many)), ErrorCode.INVALID_ARGUMENT,
            "at most 16 participants.*this one has 17")
    refused(lambda: silos[0].decrypt(DecryptRequest(round_id="r-17", participants=tuple(p.name for p in many),
                                                    ciphertexts=(b"",))),
            ErrorCode.INVALID_ARGUMENT, "at most 16 participants")
    # The count is checked before anything looks at the names: a repeat among thousands of names used to be
    # searched for with list.count per name, minutes of one worker for one request the size limit admits.
    thousands = tuple(p.name for p in many) + tuple(f"silo-{k}" for k in range(5000))
    refused(lambda: silos[0].decrypt(DecryptRequest(round_id="r-17", participants=thousands, ciphertexts=(b"",))),
            ErrorCode.INVALID_ARGUMENT, "at most 16 participants.*this one has 5017")
    assert len(silos[0].secure_score(good).ciphertexts) == 1  # the round id was not used up, and it still serves
    seventeen = [InProcessSiloClient(SiloService(f"silo-{k}", ScaledModel(1.0))) for k in range(17)]
    with pytest.raises(ValueError, match="at most 16 silos' terms.*this consortium has 17"):
        SecureFusion(seventeen, coordinator_context(kits["coordinator"]))


def test_a_round_record_replaced_under_the_serving_silo_refuses_secure_rounds_and_clear_ones_go_on(silos) -> None:
    """Ids appended to a record no longer in place would be forgotten at the next start: no more secure rounds."""
    record = silos[0].secure.rounds.path
    restored = record.with_name("restored.jsonl")
    restored.write_bytes(record.read_bytes())
    restored.replace(record)
    good = request(silos, "after-replace")
    refused(lambda: silos[0].secure_score(good), ErrorCode.FAILED_PRECONDITION,
            "could not record round 'after-replace'.*was replaced or removed while the silo serves")
    refused(lambda: silos[0].secure_score(good), ErrorCode.FAILED_PRECONDITION, "was replaced or removed")
    assert silos[0].score(replace(good.score, weights=())).scores == (1.0,)  # clear rounds: it still serves


def test_a_score_beyond_the_fixed_point_range_fails_as_the_silos_own_precondition(kits, tmp_path: Path) -> None:
    service = SiloService("hospital-a", ScaledModel(1e5))  # standardised score ~2e5, beyond 2^15
    broken = InProcessSiloClient(service, secure=secure_rounds(service, kits["hospital-a"], tmp_path / "a.jsonl"))
    silos = [broken, *clients(kits, tmp_path)[1:]]
    refused(lambda: broken.secure_score(request(silos, "too-large")), ErrorCode.FAILED_PRECONDITION,
            "cannot encode its scores for round 'too-large'.*beyond the fixed-point range.*check its reward model")


def participant_of(kit: CertKit) -> Participant:
    """The participant entry whoever holds `kit` would present: its certificate and a key-agreement key it signed."""
    certificate_key = serialization.load_pem_private_key(kit.key_path.read_bytes(), password=None)
    _, signed = new_agreement_key(certificate_key, kit.certificate())
    return Participant(name=kit.identity().name, agreement_key=signed.to_json(),
                       certificate_pem=kit.cert_path.read_bytes())


@pytest.mark.parametrize("which", BAD_BANK_B_CERTIFICATES)
def test_a_participant_whose_certificate_is_revoked_or_out_of_its_validity_is_refused(silos, kits, which) -> None:
    """Signed by the CA yet revoked (its holder could unmask hospital-a's terms with it), expired or not yet valid."""
    good = request(silos[:2], f"with bank-b {which}")
    impostor = participant_of(kits[f"bank-b {which}"])
    refused(lambda: silos[0].secure_score(replace(good, participants=(good.participants[0], impostor))),
            ErrorCode.PERMISSION_DENIED, "revoked on this silo's CRL" if which == "revoked" else "is valid only from")
    assert len(silos[0].secure_score(request(silos[:2], f"after bank-b {which}")).ciphertexts) == 1  # still serves


def test_a_secure_round_over_the_silos_daily_cap_is_refused_logged_and_costs_nothing(kits, tmp_path: Path) -> None:
    from coordinator.network_client import NetworkSiloClient
    from mor_secure.audit import AuditLog, read_log
    from mor_secure.policy import SiloAdmission, SiloPolicy
    from mor_secure.transport.server import serve
    from silo_agent.servicer import ROLES_BY_RPC, servicer_registration

    local = clients(kits, tmp_path)
    kit = kits["hospital-a"]
    log = AuditLog.for_kit(tmp_path / "audit.db", kit, checkpoint_every_entries=1)
    running = serve(kit=kit, crl_path=kit.crl_path, roles_by_rpc=ROLES_BY_RPC, audit=log,
                    admission=SiloAdmission(SiloPolicy(daily_cap=2)),
                    services=[servicer_registration(local[0].service, secure=local[0].secure)])
    running.set_serving(True)
    remote = NetworkSiloClient("hospital-a", f"127.0.0.1:{running.port}", kits["coordinator"], retries=0)
    try:
        remote.secure_score(request(local, "within-cap-1"))
        remote.secure_score(request(local, "within-cap-2"))
        refused(lambda: remote.secure_score(request(local, "over-cap")), ErrorCode.RESOURCE_EXHAUSTED,
                "daily cap of 2")
        assert not local[0].secure.rounds.seen("answered", "over-cap")  # refused before anything was scored
        last = read_log(log.path).entries[-1].fields()
        assert (last["rpc"].endswith("/SecureScore"), last["decision"], last["status"], last["round_id"]) == (
            True, "refused", "RESOURCE_EXHAUSTED", "over-cap")
        with grpc.secure_channel(f"127.0.0.1:{running.port}", channel_credentials(kits["coordinator"])) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status \
                == health_pb2.HealthCheckResponse.SERVING  # the server still answers (health is not capped)
    finally:
        remote.close()
        running.stop(0)
        log.close()


def test_a_replayed_round_id_is_refused_after_the_silo_restarts(kits, tmp_path: Path) -> None:
    """Masks depend only on the round id and participants: a restarted silo answering a round id again would give
    two answers under the same masks, whose difference is its terms. Also a second decryption after a restart."""
    from coordinator.network_client import NetworkSiloClient
    from mor_secure.policy import SiloAdmission, SiloPolicy
    from mor_secure.transport.server import serve
    from silo_agent.servicer import ROLES_BY_RPC, servicer_registration

    (tmp_path / "peers").mkdir()
    local, kit = clients(kits, tmp_path / "peers"), kits["hospital-a"]
    record = tmp_path / "hospital-a" / "secure_rounds.jsonl"
    record.parent.mkdir()

    def started(secure: SecureRounds):
        running = serve(kit=kit, crl_path=kit.crl_path, roles_by_rpc=ROLES_BY_RPC,
                        admission=SiloAdmission(SiloPolicy()),
                        services=[servicer_registration(local[0].service, secure=secure)])
        running.set_serving(True)
        return running, NetworkSiloClient("hospital-a", f"127.0.0.1:{running.port}", kits["coordinator"], retries=0)

    first = request(local, "before-restart")
    decrypt = DecryptRequest(round_id="before-restart", participants=tuple(p.name for p in first.participants),
                             ciphertexts=())
    secure = secure_rounds(local[0].service, kit, record)
    running, remote = started(secure)
    try:
        (ciphertext,) = remote.secure_score(first).ciphertexts
        remote.decrypt(replace(decrypt, ciphertexts=(ciphertext,)))
    finally:
        remote.close()
        running.stop(0)
        secure.rounds.close()  # as `mor silo serve` does when it stops
    running, remote = started(secure_rounds(local[0].service, kit, record))  # the restart: a new process's state
    try:
        refused(lambda: remote.secure_score(replace(first, score=replace(first.score, weights=(0.25,)))),
                ErrorCode.FAILED_PRECONDITION, "was already answered")
        refused(lambda: remote.decrypt(replace(decrypt, ciphertexts=(ciphertext,))), ErrorCode.FAILED_PRECONDITION,
                "was already decrypted")
        assert len(remote.secure_score(request(local, "after-restart")).ciphertexts) == 1  # and it still serves
    finally:
        remote.close()
        running.stop(0)
