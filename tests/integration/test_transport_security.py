"""Every security property of the silo's mTLS gRPC server, against a real server on 127.0.0.1 port 0.

Each refusal asserts the exact status code and that the server still answers
a good request afterwards. Certificates come from the project's own PKI code.
The reward model is a fake (these tests are about the transport around it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from silo_fakes import RightAnswerModel, png

from coordinator.network_client import NetworkSiloClient
from mor_secure.audit import AuditLog, read_log
from mor_secure.pki import CertificateAuthority, CertKit, PartyIdentity
from mor_secure.policy import RateLimit, RequestLimits, SiloAdmission, SiloPolicy
from mor_secure.proto.v1 import silo_pb2, silo_pb2_grpc
from mor_secure.transport.authorization import DEFAULT_MAX_OPEN_STREAMS
from mor_secure.transport.server import RunningServer, ServerSettings, serve
from mor_secure.wire import ErrorCode, ImageBlob, ScoreRequest, ScoreRow, SiloError, serde
from mor_secure.wire.messages import DecryptRequest, SecureScoreRequest
from silo_agent.config import ServeSettings
from silo_agent.service import SiloService
from silo_agent.serving import server_settings
from silo_agent.servicer import ROLES_BY_RPC, SERVICE_NAME, servicer_registration

RED = ImageBlob.of(png((200, 30, 30)))
GOOD = ScoreRequest(objective="correct", images=(RED,),
                    rows=(ScoreRow(0, "what shape?", "right"), ScoreRow(0, "what shape?", "wrong")))


@pytest.fixture(scope="module")
def consortium_pki(tmp_path_factory: pytest.TempPathFactory):
    """This module's own PKI (revocation tests change its CRL)."""
    root = tmp_path_factory.mktemp("transport-pki")
    ca = CertificateAuthority.create(root / "ca")

    def kit(role: str, name: str, folder: str | None = None, **kwargs) -> CertKit:
        return ca.issue(PartyIdentity(role, name), root / "kits" / (folder or f"{role}-{name}"), **kwargs)

    return ca, kit, {"silo": kit("silo", "hospital-a"), "coordinator": kit("coordinator", "coordinator"),
                     "auditor": kit("auditor", "auditor"), "other-silo": kit("silo", "bank-b")}


def start(ca, silo_kit: CertKit, tmp_path: Path, policy: SiloPolicy | None = None,
          audit=None, model: RightAnswerModel | None = None) -> tuple[RunningServer, AuditLog]:
    policy = policy or SiloPolicy()
    audit = audit or AuditLog.for_kit(tmp_path / "audit.db", silo_kit, checkpoint_every_entries=1)
    service = SiloService("hospital-a", model or RightAnswerModel(), limits=policy.limits,
                          max_weight=policy.max_weight)
    running = serve(kit=silo_kit, crl_path=ca.directory / "crl.pem", services=[servicer_registration(service)],
                    roles_by_rpc=ROLES_BY_RPC, admission=SiloAdmission(policy), audit=audit)
    running.set_serving(True)
    return running, audit


def logged(audit: AuditLog) -> list[dict]:
    """The call entries of a silo's audit log, oldest first."""
    return [e.fields() for e in read_log(audit.path).entries if e.fields().get("event") == "call"]


@pytest.fixture
def server(consortium_pki, tmp_path: Path) -> Iterator[tuple[RunningServer, AuditLog]]:
    ca, _, kits = consortium_pki
    running, audit = start(ca, kits["silo"], tmp_path)
    yield running, audit
    running.stop(0)
    audit.close()


def client(port: int, kit: CertKit) -> NetworkSiloClient:
    return NetworkSiloClient("hospital-a", f"127.0.0.1:{port}", kit, retries=0, deadline_s=10)


def still_serves(port: int, kits) -> None:
    good = client(port, kits["coordinator"])
    try:
        assert good.score(GOOD).scores == (1.0, -1.0)
    finally:
        good.close()


def raw_stub(port: int, credentials: grpc.ChannelCredentials) -> tuple[grpc.Channel, silo_pb2_grpc.SiloRewardServiceStub]:
    channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials)
    return channel, silo_pb2_grpc.SiloRewardServiceStub(channel)


def rpc_code(call, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    return caught.value.code()


def test_every_rpc_of_every_servicer_is_in_the_roles_table_and_the_policy_schema() -> None:
    from mor_secure.policy.schema import RPCS

    for service in silo_pb2.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            assert f"/{service.full_name}/{method.name}" in ROLES_BY_RPC, method.full_name
            assert method.name in RPCS, method.full_name
    assert set(ROLES_BY_RPC) == {f"/{SERVICE_NAME}/{m}" for m in RPCS}


def test_a_connection_without_a_client_certificate_is_refused(server, consortium_pki) -> None:
    running, _ = server
    ca, _, kits = consortium_pki
    channel, stub = raw_stub(running.port, grpc.ssl_channel_credentials(root_certificates=kits["silo"].ca_path.read_bytes()))
    with channel:
        assert rpc_code(stub.Describe, silo_pb2.DescribeRequest()) == grpc.StatusCode.UNAVAILABLE
    still_serves(running.port, kits)


def test_a_certificate_from_another_ca_is_refused(server, consortium_pki, tmp_path: Path) -> None:
    running, _ = server
    _, _, kits = consortium_pki
    rogue_ca = CertificateAuthority.create(tmp_path / "rogue-ca")
    rogue = rogue_ca.issue(PartyIdentity("coordinator", "coordinator"), tmp_path / "rogue-kit")
    credentials = grpc.ssl_channel_credentials(root_certificates=kits["coordinator"].ca_path.read_bytes(),
                                               private_key=rogue.key_path.read_bytes(),
                                               certificate_chain=rogue.cert_path.read_bytes())
    channel, stub = raw_stub(running.port, credentials)
    with channel:
        assert rpc_code(stub.Describe, silo_pb2.DescribeRequest()) == grpc.StatusCode.UNAVAILABLE
    still_serves(running.port, kits)


def test_an_expired_certificate_is_refused(server, consortium_pki) -> None:
    running, _ = server
    _, kit, kits = consortium_pki
    expired = kit("coordinator", "coordinator", "expired-coordinator",
                  not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30), lifetime=dt.timedelta(days=1))
    with pytest.raises(SiloError) as caught:
        client(running.port, expired).describe()
    assert caught.value.code == ErrorCode.UNAVAILABLE
    still_serves(running.port, kits)


def test_a_revoked_certificate_is_refused_also_on_a_channel_opened_before(server, consortium_pki) -> None:
    running, audit = server
    ca, kit, kits = consortium_pki
    doomed_kit = kit("coordinator", "coordinator", "doomed-coordinator")
    doomed = client(running.port, doomed_kit)
    assert doomed.score(GOOD).scores == (1.0, -1.0)  # the channel is open and working
    ca.revoke(serial=doomed_kit.certificate().serial_number, reason="key compromise drill")
    with pytest.raises(SiloError, match="is revoked") as caught:
        doomed.score(GOOD)
    assert caught.value.code == ErrorCode.UNAUTHENTICATED
    doomed.close()
    still_serves(running.port, kits)
    assert any(e["decision"] == "refused" and e["status"] == "UNAUTHENTICATED" and "revoked" in e["reason"]
               for e in logged(audit))


def test_a_certificate_that_expires_on_an_open_channel_is_refused_on_it(server, consortium_pki) -> None:
    """The handshake checks the dates once; keepalive pings hold a connection open for good, so a stolen key
    whose certificate ran out would otherwise go on being served on a connection opened before."""
    running, audit = server
    _, kit, kits = consortium_pki
    # issue() starts a certificate 5 minutes before not_before (clock skew), so this one ends 4 s from now.
    short_lived = kit("coordinator", "coordinator", "short-lived-coordinator",
                      not_before=dt.datetime.now(dt.timezone.utc), lifetime=dt.timedelta(minutes=5, seconds=4))
    ending = client(running.port, short_lived)
    try:
        assert ending.score(GOOD).scores == (1.0, -1.0)  # the channel is open and working
        time.sleep(max(0.0, (short_lived.certificate().not_valid_after_utc
                             - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 1.0)
        with pytest.raises(SiloError, match="not now; renew the kit and reconnect") as caught:
            ending.score(GOOD)
        assert caught.value.code == ErrorCode.UNAUTHENTICATED
    finally:
        ending.close()
    still_serves(running.port, kits)
    refusal = [e for e in logged(audit) if e["serial"] == f"{short_lived.certificate().serial_number:x}"][-1]
    assert (refusal["decision"], refusal["status"]) == ("refused", "UNAUTHENTICATED")


def test_a_method_the_server_lacks_is_on_record_and_unimplemented_only_for_a_party_in_good_standing(
        server, consortium_pki) -> None:
    """gRPC answers an unknown method itself, before any interceptor's wrapper: a revoked party could map the
    server's methods off the record. The wrapper now takes those calls too."""
    running, audit = server
    ca, kit, kits = consortium_pki
    revoked = kit("silo", "bank-c", "revoked-method-prober")
    ca.revoke(serial=revoked.certificate().serial_number, reason="key compromise drill")
    before = len(logged(audit))
    for who, expected in ((kits["auditor"], grpc.StatusCode.UNIMPLEMENTED), (revoked, grpc.StatusCode.UNAUTHENTICATED)):
        with grpc.secure_channel(f"127.0.0.1:{running.port}", _credentials(who)) as channel:
            for method in (f"/{SERVICE_NAME}/NoSuchMethod", "/no.such.Service/Call"):
                call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
                assert rpc_code(call, b"\x08\x01") == expected, (who.identity(), method)
    assert [(e["rpc"], e["decision"], e["status"]) for e in logged(audit)[before:]] == [
        (f"/{SERVICE_NAME}/NoSuchMethod", "refused", "UNIMPLEMENTED"),
        ("/no.such.Service/Call", "refused", "UNIMPLEMENTED"),
        (f"/{SERVICE_NAME}/NoSuchMethod", "refused", "UNAUTHENTICATED"),
        ("/no.such.Service/Call", "refused", "UNAUTHENTICATED")]
    # The name is the caller's text: recorded bounded, as every other text a caller chooses.
    with grpc.secure_channel(f"127.0.0.1:{running.port}", _credentials(kits["auditor"])) as channel:
        long_name = f"/{SERVICE_NAME}/" + "N" * 6000
        call = channel.unary_unary(long_name, request_serializer=None, response_deserializer=None)
        assert rpc_code(call, b"") == grpc.StatusCode.UNIMPLEMENTED
    (entry,) = logged(audit)[before + 4:]
    assert entry["status"] == "UNIMPLEMENTED" and len(entry["rpc"]) < 400 < len(long_name)
    still_serves(running.port, kits)


def test_a_malformed_health_request_is_invalid_argument_on_record_after_the_identity_checks(server,
                                                                                          consortium_pki) -> None:
    """Health and reflection parse their requests after the decision: gRPC's own parser failed first, INTERNAL
    with a traceback, off the record, and a revoked party got that answer too."""
    running, audit = server
    ca, kit, kits = consortium_pki
    revoked = kit("silo", "bank-c", "revoked-health-caller")
    ca.revoke(serial=revoked.certificate().serial_number, reason="key compromise drill")
    before = len(logged(audit))
    for who, expected in ((kits["coordinator"], grpc.StatusCode.INVALID_ARGUMENT),
                          (revoked, grpc.StatusCode.UNAUTHENTICATED)):
        with grpc.secure_channel(f"127.0.0.1:{running.port}", _credentials(who)) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                        response_deserializer=None)
            assert rpc_code(check, b"\xff\xff\xff") == expected, who.identity()
            watch = channel.unary_stream("/grpc.health.v1.Health/Watch", request_serializer=None,
                                         response_deserializer=None)
            with pytest.raises(grpc.RpcError) as ended:
                next(watch(b"\xff\xff\xff", timeout=10))
            assert ended.value.code() == expected, who.identity()
    assert [(e["rpc"].rsplit("/", 1)[1], e["decision"], e["status"]) for e in logged(audit)[before:]] == [
        ("Check", "refused", "INVALID_ARGUMENT"), ("Watch", "refused", "INVALID_ARGUMENT"),
        ("Check", "refused", "UNAUTHENTICATED"), ("Watch", "refused", "UNAUTHENTICATED")]
    with grpc.secure_channel(f"127.0.0.1:{running.port}", _credentials(kits["coordinator"])) as channel:
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    still_serves(running.port, kits)


def test_an_older_crl_put_back_does_not_un_revoke(server, consortium_pki, caplog) -> None:
    running, _ = server
    ca, kit, kits = consortium_pki
    crl = ca.directory / "crl.pem"
    before = crl.read_bytes()  # CA-signed, but from before the revocation
    doomed_kit = kit("coordinator", "coordinator", "rolled-back-coordinator")
    ca.revoke(serial=doomed_kit.certificate().serial_number, reason="key compromise drill")
    doomed = client(running.port, doomed_kit)
    with pytest.raises(SiloError, match="is revoked"):
        doomed.score(GOOD)  # the server has read the newer CRL
    crl.write_bytes(before)
    with caplog.at_level(logging.ERROR, logger="mor_secure.transport.revocation"):
        with pytest.raises(SiloError, match="is revoked") as caught:
            doomed.score(GOOD)
    assert caught.value.code == ErrorCode.UNAUTHENTICATED
    assert any("is older than the" in r.getMessage() and "would un-revoke" in r.getMessage() for r in caplog.records)
    doomed.close()
    still_serves(running.port, kits)
    ca.write_crl()  # leave the module's PKI with a current CRL for the tests after this one


def test_a_silo_certificate_may_not_call_a_coordinator_rpc(server, consortium_pki) -> None:
    running, _ = server
    _, _, kits = consortium_pki
    with pytest.raises(SiloError, match="role silo may not call") as caught:
        client(running.port, kits["other-silo"]).score(GOOD)
    assert caught.value.code == ErrorCode.PERMISSION_DENIED
    assert client(running.port, kits["auditor"]).describe().name == "hospital-a"  # auditors may read the description
    with pytest.raises(SiloError) as caught:
        client(running.port, kits["auditor"]).score(GOOD)
    assert caught.value.code == ErrorCode.PERMISSION_DENIED
    still_serves(running.port, kits)


def test_a_caller_not_in_the_silos_policy_is_refused(server, consortium_pki) -> None:
    running, _ = server
    _, kit, kits = consortium_pki
    rogue = kit("coordinator", "rogue-coordinator")
    with pytest.raises(SiloError, match="is not allowed to call Score by this silo's policy") as caught:
        client(running.port, rogue).score(GOOD)
    assert caught.value.code == ErrorCode.PERMISSION_DENIED
    still_serves(running.port, kits)


def test_the_rate_limit_and_the_daily_cap_are_resource_exhausted(consortium_pki, tmp_path: Path) -> None:
    ca, _, kits = consortium_pki
    for policy, match in ((SiloPolicy(rate_limit=RateLimit(per_second=0.01, burst=2)), "over this silo's rate limit"),
                          (SiloPolicy(daily_cap=2), "used its daily cap of 2")):
        running, _ = start(ca, kits["silo"], tmp_path / match[:8], policy)
        try:
            coordinator = client(running.port, kits["coordinator"])
            assert coordinator.score(GOOD).scores and coordinator.score(GOOD).scores
            with pytest.raises(SiloError, match=match) as caught:
                coordinator.score(GOOD)
            assert caught.value.code == ErrorCode.RESOURCE_EXHAUSTED
            # Another caller is unaffected: limits are per caller.
            assert client(running.port, kits["auditor"]).describe().name == "hospital-a"
        finally:
            running.stop(0)


def test_oversize_undecodable_and_nan_weighted_messages_are_refused(consortium_pki, tmp_path: Path) -> None:
    ca, _, kits = consortium_pki
    policy = SiloPolicy(limits=RequestLimits(max_request_bytes=64 << 10, max_image_bytes=1 << 20))
    running, _ = start(ca, kits["silo"], tmp_path, policy)
    try:
        channel, stub = raw_stub(running.port, _credentials(kits["coordinator"]))
        with channel:
            blob = png((1, 2, 3)) + b"\0" * (100 << 10)
            big = silo_pb2.ScoreRequest(images=[silo_pb2.ImageBlob(sha256=ImageBlob.of(blob).sha256_bytes(), data=blob)],
                                        rows=[silo_pb2.ScoreRow(image=0, prompt=b"q", response=b"r")])
            assert rpc_code(stub.Score, big) == grpc.StatusCode.INVALID_ARGUMENT
            # Above the transport's own 32 MiB cap gRPC refuses before any of our code runs.
            huge = silo_pb2.ScoreRequest(images=[silo_pb2.ImageBlob(sha256=b"\0" * 32, data=b"\0" * (33 << 20))])
            assert rpc_code(stub.Score, huge) == grpc.StatusCode.RESOURCE_EXHAUSTED
            not_utf8 = silo_pb2.ScoreRequest(images=[silo_pb2.ImageBlob(sha256=RED.sha256_bytes(), data=RED.data)],
                                             rows=[silo_pb2.ScoreRow(image=0, prompt=b"\xff\xfe", response=b"r")])
            assert rpc_code(stub.Score, not_utf8) == grpc.StatusCode.INVALID_ARGUMENT
            nan_weights = serde.score_request_to_proto(GOOD)
            nan_weights.weights.extend([0.5, float("nan")])
            assert rpc_code(stub.Score, nan_weights) == grpc.StatusCode.INVALID_ARGUMENT
            # A palette PNG with transparency but no palette: PIL's convert("RGB") fails an assertion on it.
            no_palette = serde.score_request_to_proto(ScoreRequest(objective="correct", images=(ImageBlob.of(
                _palette_png_without_plte()),), rows=(ScoreRow(0, "q", "right"),)))
            assert rpc_code(stub.Score, no_palette) == grpc.StatusCode.INVALID_ARGUMENT
        still_serves(running.port, kits)
    finally:
        running.stop(0)


def _palette_png_without_plte() -> bytes:
    """A 2x2 palette PNG (colour type 3) with a tRNS chunk and no PLTE chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 3, 0, 0, 0))
            + chunk(b"tRNS", b"\x00") + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00" * 2)) + chunk(b"IEND", b""))


def _unknown_field_padding(size: int) -> bytes:
    """A valid message of any type: `size` bytes in an unknown length-delimited field (number 15)."""
    return b"\x7a" + _varint(size) + b"A" * size


def _varint(value: int) -> bytes:
    out = b""
    while value > 0x7F:
        out += bytes([(value & 0x7F) | 0x80])
        value >>= 7
    return out + bytes([value])


def test_every_rpc_refuses_a_request_over_max_request_bytes_before_parsing_it(consortium_pki, tmp_path: Path) -> None:
    """Describe and AgreementKey used to parse and answer 30 MiB whatever the policy said (the auditor's too)."""
    ca, _, kits = consortium_pki
    running, audit = start(ca, kits["silo"], tmp_path, SiloPolicy(limits=RequestLimits(max_request_bytes=64 << 10)))
    try:
        padding = _unknown_field_padding(100 << 10)
        for kit, rpc in ((kits["auditor"], "Describe"), (kits["coordinator"], "Describe"),
                         (kits["coordinator"], "AgreementKey")):
            with grpc.secure_channel(f"127.0.0.1:{running.port}", _credentials(kit)) as channel:
                call = channel.unary_unary(f"/{SERVICE_NAME}/{rpc}", request_serializer=lambda raw: raw,
                                           response_deserializer=lambda raw: raw)
                with pytest.raises(grpc.RpcError) as refused:
                    call(padding, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc
            assert "this silo's policy allows at most 65536" in refused.value.details()
            assert logged(audit)[-1]["status"] == "INVALID_ARGUMENT"
        assert client(running.port, kits["auditor"]).describe().name == "hospital-a"
        still_serves(running.port, kits)
    finally:
        running.stop(0)
        audit.close()


def test_a_request_of_more_rows_than_the_policy_allows_is_refused_before_a_row_is_converted(
        consortium_pki, tmp_path: Path, monkeypatch) -> None:
    """4 MB of empty rows is 2 million of them, within max_request_bytes: serde built a dataclass for each (8 MiB:
    13 s and 750 MB) before the service's own count check refused them."""
    ca, _, kits = consortium_pki
    converted = Counter()
    for name in ("score_request_from_proto", "bits_request_from_proto", "secure_score_request_from_proto"):
        monkeypatch.setattr(serde, name, lambda *a, _name=name, _real=getattr(serde, name): (
            converted.update([_name]), _real(*a))[1])
    running, audit = start(ca, kits["silo"], tmp_path)
    rows = b"\x1a\x00" * 2_000_000  # field 3 (rows of a ScoreRequest, pairs of a BitsRequest), empty, 2M times
    score = b"\x22\x07correct" + rows
    requests = {"Score": (score, "rows"), "CorrectnessBits": (b"\x2a\x07correct" + rows, "pairs"),
                "SecureScore": (b"\x0a" + _varint(len(score)) + score, "rows")}
    try:
        with grpc.secure_channel(f"127.0.0.1:{running.port}", _credentials(kits["coordinator"])) as channel:
            for rpc, (raw, label) in requests.items():
                call = channel.unary_unary(f"/{SERVICE_NAME}/{rpc}", request_serializer=lambda raw: raw,
                                           response_deserializer=lambda raw: raw)
                with pytest.raises(grpc.RpcError) as refused:
                    call(raw, timeout=60)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc
                assert refused.value.details().startswith(f"2000000 {label} in one request; this silo's policy "
                                                          "allows at most 1024"), rpc
                assert logged(audit)[-1]["status"] == "INVALID_ARGUMENT"
        assert not converted, converted
        still_serves(running.port, kits)
        assert converted["score_request_from_proto"] == 1  # the wrapper sees what the silo converts
    finally:
        running.stop(0)
        audit.close()


def test_a_secure_round_of_more_participants_than_the_protocol_allows_is_refused_before_one_is_converted(
        consortium_pki, tmp_path: Path, monkeypatch) -> None:
    """8 MiB of empty participants is 4 million of them: serde built each (11.6 s, +850 MB of the server's memory,
    a review probe) before the secure round's own check of at most 16 refused them; so did a Decrypt's."""
    ca, _, kits = consortium_pki
    converted = Counter()
    for name in ("secure_score_request_from_proto", "decrypt_request_from_proto"):
        monkeypatch.setattr(serde, name, lambda *a, _name=name, _real=getattr(serde, name): (
            converted.update([_name]), _real(*a))[1])
    running, audit = start(ca, kits["silo"], tmp_path)
    empty_entries = b"\x12\x00" * 2_000_000  # field 2 (participants of both requests), empty, 2M times
    requests = {"SecureScore": empty_entries, "Decrypt": b"\x0a\x01r" + empty_entries,
                "Decrypt ": b"\x0a\x01r\x12\x00" + b"\x1a\x00" * 2_000_000}  # one participant, 2M ciphertexts
    refusals = {"SecureScore": "a secure round has at most 16 participants (its sum would overflow the fixed-point "
                               "range); this one has 2000000",
                "Decrypt": "a secure round has at most 16 participants",
                "Decrypt ": "a Decrypt request carries one ciphertext, the round's blinded sum; this one has 2000000"}
    try:
        with grpc.secure_channel(f"127.0.0.1:{running.port}", _credentials(kits["coordinator"])) as channel:
            for rpc, raw in requests.items():
                call = channel.unary_unary(f"/{SERVICE_NAME}/{rpc.strip()}", request_serializer=lambda raw: raw,
                                           response_deserializer=lambda raw: raw)
                with pytest.raises(grpc.RpcError) as refused:
                    call(raw, timeout=60)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc
                assert refused.value.details().startswith(refusals[rpc]), (rpc, refused.value.details())
                assert logged(audit)[-1]["status"] == "INVALID_ARGUMENT"
        assert not converted, converted
        still_serves(running.port, kits)
    finally:
        running.stop(0)
        audit.close()


def test_a_server_that_cannot_listen_says_why_in_one_line(consortium_pki) -> None:
    """gRPC's RuntimeError "Failed to bind to address ...; set GRPC_VERBOSITY=debug" reached the operator of
    `mor silo serve` as a traceback (operator walkthrough helper-76)."""
    ca, _, kits = consortium_pki
    service = SiloService("hospital-a", RightAnswerModel())

    def start_on(host: str, port: int) -> None:
        serve(kit=kits["silo"], crl_path=ca.directory / "crl.pem", services=[servicer_registration(service)],
              roles_by_rpc=ROLES_BY_RPC, settings=ServerSettings(host=host, port=port))

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"^cannot listen on 127.0.0.1:{port}: port {port} is in use \(another "
                           "server, or a silo already serving\); choose another serve.port or --port$"):
            start_on("127.0.0.1", port)
    if socket.has_ipv6:  # gRPC takes an IPv6 address in brackets, which the name lookup does not
        with socket.socket(socket.AF_INET6) as taken:
            taken.bind(("::1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(ValueError, match=rf"^cannot listen on \[::1\]:{port}: port {port} is in use"):
                start_on("[::1]", port)
        with pytest.raises(ValueError, match=r"^cannot listen on ::1:0: an IPv6 address is written in brackets, as "
                           r"\[::1\]; fix serve.host$"):
            start_on("::1", 0)
    # 192.0.2.1 (TEST-NET-1, RFC 5737) is an address but none of this machine's: nothing leaves it, not even DNS.
    with pytest.raises(ValueError, match=r"^cannot listen on 192.0.2.1:0: Cannot assign requested address; fix "
                       "serve.host or serve.port$"):
        start_on("192.0.2.1", 0)


class ExitingOnceModel(RightAnswerModel):
    """Raises SystemExit on its first call, as a library calling sys.exit() in a worker thread would."""

    def side_inputs(self, images, prompts, responses):
        if self.calls == 0:
            self.calls += 1
            raise SystemExit("a library gave up")
        return super().side_inputs(images, prompts, responses)


def test_a_handler_that_raises_a_base_exception_is_answered_internal_on_record_and_frees_its_slot(
        consortium_pki, tmp_path: Path) -> None:
    """The wrapper caught Exception only: on a SystemExit gRPC answered nothing (the caller waited for its
    deadline), the silo recorded nothing, and the policy slot stayed taken, so with max_concurrent_requests 1
    every later call was RESOURCE_EXHAUSTED until the silo restarted."""
    ca, _, kits = consortium_pki
    policy = SiloPolicy(max_concurrent_requests=1)
    running, audit = start(ca, kits["silo"], tmp_path, policy, model=ExitingOnceModel())
    coordinator = NetworkSiloClient("hospital-a", f"127.0.0.1:{running.port}", kits["coordinator"], retries=0,
                                    deadline_s=3)
    try:
        with pytest.raises(SiloError) as failed:
            coordinator.score(GOOD)
        assert failed.value.code == ErrorCode.INTERNAL, failed.value
        assert logged(audit)[-1]["status"] == "INTERNAL" and logged(audit)[-1]["reason"] == "SystemExit"
        still_serves(running.port, kits)
    finally:
        coordinator.close()
        running.stop(0)
        audit.close()


def test_a_request_without_weights_is_refused_when_the_policy_caps_the_weight(consortium_pki, tmp_path: Path) -> None:
    """No weights means weight 1 on every row: under max_weight 0.5 that is above the cap, as an explicit 1 is."""
    ca, _, kits = consortium_pki
    running, audit = start(ca, kits["silo"], tmp_path, SiloPolicy(max_weight=0.5))
    coordinator = client(running.port, kits["coordinator"])
    try:
        with pytest.raises(SiloError, match="weight 1 on every row; this silo's policy allows") as refused:
            coordinator.score(GOOD)
        assert refused.value.code == ErrorCode.PERMISSION_DENIED
        assert coordinator.score(replace(GOOD, weights=(0.5, 0.25))).scores == (0.5, -0.25)  # still serves
    finally:
        coordinator.close()
        running.stop(0)
        audit.close()


def test_the_decoded_pixels_of_a_whole_request_are_capped(consortium_pki, tmp_path: Path) -> None:
    """Each image within max_image_pixels, the request over max_request_pixels: refused from the headers."""
    ca, _, kits = consortium_pki
    limits = RequestLimits(max_image_pixels=64 * 64, max_request_pixels=3 * 64 * 64)
    running, audit = start(ca, kits["silo"], tmp_path, SiloPolicy(limits=limits))
    coordinator = client(running.port, kits["coordinator"])
    try:
        images = tuple(ImageBlob.of(png((i, 0, 0), size=(64, 64))) for i in range(4))
        rows = tuple(ScoreRow(i, "what shape?", "right") for i in range(4))
        with pytest.raises(SiloError, match=r"images\[3\] brings the request to 16384 decoded pixels; this silo's "
                           "policy allows at most 12288") as refused:
            coordinator.score(ScoreRequest(objective="correct", images=images, rows=rows))
        assert refused.value.code == ErrorCode.INVALID_ARGUMENT
        assert coordinator.score(ScoreRequest(objective="correct", images=images[:3], rows=rows[:3])).scores == \
            (1.0, 1.0, 1.0)
    finally:
        coordinator.close()
        running.stop(0)
        audit.close()


def test_a_policy_admitting_more_calls_than_the_free_workers_is_refused_at_start(consortium_pki,
                                                                                 tmp_path: Path) -> None:
    """Calls beyond the free workers were queued, not refused, and health checks waited behind them."""
    ca, _, kits = consortium_pki
    audit = AuditLog.for_kit(tmp_path / "audit.db", kits["silo"], checkpoint_every_entries=1)
    try:
        with pytest.raises(ValueError, match=r"max_concurrent_requests \(16\) plus max_open_streams \(2\) must be "
                           r"below max_workers \(8\)"):
            start(ca, kits["silo"], tmp_path, SiloPolicy(max_concurrent_requests=16), audit=audit)
        running, _ = start(ca, kits["silo"], tmp_path, SiloPolicy(max_concurrent_requests=5), audit=audit)  # 5 + 2 < 8
        still_serves(running.port, kits)
        running.stop(0)
    finally:
        audit.close()


class _BlockedModel(RightAnswerModel):
    """Scores only once `go` is set: the calls it is asked hold their policy slots and workers until then."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def side_inputs(self, images, prompts, responses):
        assert self.go.wait(30)
        return super().side_inputs(images, prompts, responses)


def test_with_every_slot_taken_calls_are_refused_and_health_is_answered(consortium_pki, tmp_path: Path) -> None:
    """`mor silo serve`'s workers hold every call its policy admits, every stream, and spares for the rest."""
    ca, _, kits = consortium_pki
    policy = SiloPolicy(max_concurrent_requests=8, rate_limit=RateLimit(per_second=100, burst=100))
    model, admission = _BlockedModel(), SiloAdmission(policy)
    audit = AuditLog.for_kit(tmp_path / "audit.db", kits["silo"], checkpoint_every_entries=1)
    running = serve(kit=kits["silo"], crl_path=ca.directory / "crl.pem", roles_by_rpc=ROLES_BY_RPC,
                    services=[servicer_registration(SiloService("hospital-a", model))], admission=admission,
                    audit=audit, settings=server_settings(ServeSettings(kit=kits["silo"].directory), policy))
    running.set_serving(True)
    coordinator = client(running.port, kits["coordinator"])
    try:
        with ThreadPoolExecutor(policy.max_concurrent_requests) as pool:
            held = [pool.submit(coordinator.score, GOOD) for _ in range(policy.max_concurrent_requests)]
            deadline = time.monotonic() + 10
            while admission._in_flight < policy.max_concurrent_requests:
                assert time.monotonic() < deadline, "the calls were not all admitted"
                time.sleep(0.05)
            with pytest.raises(SiloError, match="serves at most 8 requests at once") as refused:
                coordinator.score(GOOD)
            assert refused.value.code == ErrorCode.RESOURCE_EXHAUSTED
            with grpc.secure_channel(f"127.0.0.1:{running.port}", _credentials(kits["auditor"])) as channel:
                assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status \
                    == health_pb2.HealthCheckResponse.SERVING
            model.go.set()
            assert all(call.result(timeout=30).scores == (1.0, -1.0) for call in held)
    finally:
        model.go.set()
        coordinator.close()
        running.stop(0)
        audit.close()


def test_a_huge_round_id_or_objective_cannot_grow_the_audit_log(server, consortium_pki, tmp_path: Path) -> None:
    """round_id and objective are recorded in every entry, a refused call's too: what a caller sends there is
    bounded, so a party refused for its role cannot write megabytes per call into the silo's log."""
    running, audit = server
    _, _, kits = consortium_pki
    request = serde.score_request_to_proto(GOOD)
    request.round_id = b"\xff" * (1 << 20)
    long_objective = serde.score_request_to_proto(GOOD)
    long_objective.objective = "x" * (1 << 20)
    for kit, message, expected in ((kits["auditor"], request, grpc.StatusCode.PERMISSION_DENIED),
                                   (kits["coordinator"], request, grpc.StatusCode.INVALID_ARGUMENT),
                                   (kits["coordinator"], long_objective, grpc.StatusCode.INVALID_ARGUMENT)):
        channel, stub = raw_stub(running.port, _credentials(kit))
        with channel:
            assert rpc_code(stub.Score, message) == expected
    entries = [e.fields() for e in read_log(audit.path).entries][-3:]
    assert [e["status"] for e in entries] == ["PERMISSION_DENIED", "INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert all(len(e.body) < 2_000 for e in read_log(audit.path).entries)
    assert entries[0]["round_id"].endswith(f"... (1048576 bytes, sha256 {hashlib.sha256(request.round_id).hexdigest()})")
    assert "round_id is 1048576 bytes; a round id has at most 128" in entries[1]["reason"]
    assert entries[2]["objective"].startswith("x" * 256 + "... (1048320 more characters")
    still_serves(running.port, kits)


def test_open_streams_are_capped_so_calls_are_still_answered(server, consortium_pki) -> None:
    """Each health Watch holds a worker thread while open: another silo opening eight used to stop the server
    answering anything. Beyond two: RESOURCE_EXHAUSTED, calls still served, and a closed stream frees its place."""
    running, _ = server
    _, _, kits = consortium_pki
    channel = grpc.secure_channel(f"127.0.0.1:{running.port}", _credentials(kits["other-silo"]))
    watch = health_pb2_grpc.HealthStub(channel).Watch
    streams = []
    try:
        for _ in range(DEFAULT_MAX_OPEN_STREAMS):
            stream = watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(stream).status == health_pb2.HealthCheckResponse.SERVING  # open, holding a worker
            streams.append(stream)
        with pytest.raises(grpc.RpcError) as refused:
            next(watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        still_serves(running.port, kits)
        streams.pop().cancel()
        deadline = time.monotonic() + 10
        while True:  # the cancelled stream's place comes back once gRPC has ended it
            try:
                reopened = watch(health_pb2.HealthCheckRequest(), timeout=10)
                assert next(reopened).status == health_pb2.HealthCheckResponse.SERVING
                streams.append(reopened)
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        for stream in streams:
            stream.cancel()
        channel.close()


def test_a_revoked_partys_open_stream_ends_unauthenticated(server, consortium_pki) -> None:
    """A Watch opened before its kit was revoked used to keep receiving, and keep its place under the cap."""
    running, _ = server
    ca, kit, kits = consortium_pki
    doomed = kit("silo", "bank-c", "doomed-watcher")
    channel = grpc.secure_channel(f"127.0.0.1:{running.port}", _credentials(doomed))
    try:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        ca.revoke(serial=doomed.certificate().serial_number, reason="key compromise drill")
        running.set_serving(False)  # the next update the stream would carry
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "is revoked" in ended.value.details()
        running.set_serving(True)
        still_serves(running.port, kits)
    finally:
        channel.close()


def test_only_calls_a_silo_answers_once_per_round_are_not_retried(consortium_pki, tmp_path: Path) -> None:
    """A silo records SecureScore's and Decrypt's round id before answering, so a retry that follows a dropped
    answer is refused as a replay; they fail at once (fusion restarts the round), Score is retried."""
    _, _, kits = consortium_pki
    with socket.socket() as probe:  # a port nothing listens on: every call is UNAVAILABLE
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = AuditLog.for_kit(tmp_path / "coordinator.db", kits["coordinator"])
    silo = NetworkSiloClient("hospital-a", f"127.0.0.1:{port}", kits["coordinator"], retries=2, deadline_s=5,
                             audit=log)
    secure = SecureScoreRequest(score=replace(GOOD, round_id="r1"), participants=())
    try:
        for call in (lambda: silo.score(GOOD), lambda: silo.secure_score(secure),
                     lambda: silo.decrypt(DecryptRequest(round_id="r1", participants=("hospital-a",),
                                                         ciphertexts=(b"x",)))):
            with pytest.raises(SiloError) as absent:
                call()
            assert absent.value.code == ErrorCode.UNAVAILABLE
    finally:
        silo.close()
        log.close()
    attempts = Counter(e.fields()["rpc"].rsplit("/", 1)[1] for e in read_log(tmp_path / "coordinator.db").entries
                       if e.fields().get("event") == "call")
    assert attempts == {"Score": 3, "SecureScore": 1, "Decrypt": 1}


def _encoded(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format=image_format)
    return buffer.getvalue()


def test_only_png_and_jpeg_images_are_decoded(server, consortium_pki) -> None:
    """ICO decodes its embedded PNG before the pixel limit can be checked; EPS is handed to Ghostscript."""
    running, _ = server
    _, _, kits = consortium_pki
    good = client(running.port, kits["coordinator"])
    try:
        for image_format in ("PNG", "JPEG"):
            blob = ImageBlob.of(_encoded(image_format))
            request = ScoreRequest(objective="correct", images=(blob,), rows=(ScoreRow(0, "what shape?", "right"),))
            assert good.score(request).scores == (1.0,)
        for image_format in ("ICO", "BMP", "GIF", "EPS"):
            blob = ImageBlob.of(_encoded(image_format))
            with pytest.raises(SiloError) as refused:
                good.score(ScoreRequest(objective="correct", images=(blob,), rows=(ScoreRow(0, "q", "right"),)))
            assert refused.value.code == ErrorCode.INVALID_ARGUMENT, image_format
            assert "could not be decoded as an image" in refused.value.message
    finally:
        good.close()
    still_serves(running.port, kits)


def _credentials(kit: CertKit) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=kit.ca_path.read_bytes(),
                                        private_key=kit.key_path.read_bytes(),
                                        certificate_chain=kit.cert_path.read_bytes())


def test_the_client_refuses_a_server_that_is_not_the_silo_it_meant_to_reach(consortium_pki, tmp_path: Path) -> None:
    """Any consortium member could listen at a silo's address; TLS pins the expected silo's per-party name."""
    ca, _, kits = consortium_pki
    impostor, _ = start(ca, kits["other-silo"], tmp_path)  # bank-b's certificate
    try:
        with pytest.raises(SiloError) as caught:
            client(impostor.port, kits["coordinator"]).describe()  # the client expects hospital-a there
        assert caught.value.code == ErrorCode.UNAVAILABLE
        honest = NetworkSiloClient("bank-b", f"127.0.0.1:{impostor.port}", kits["coordinator"], retries=0)
        assert honest.describe().name == "hospital-a"  # (the fake service's name; the certificate is bank-b's)
        honest.close()
    finally:
        impostor.stop(0)


def test_every_answer_carries_the_silos_signed_checkpoint_covering_its_own_entry(server, consortium_pki) -> None:
    from mor_secure.audit.checkpoints import verify_checkpoint
    from mor_secure.transport.authorization import CHECKPOINT_METADATA

    running, audit = server
    _, _, kits = consortium_pki
    for kit, expected in ((kits["coordinator"], grpc.StatusCode.OK),
                          (kits["auditor"], grpc.StatusCode.PERMISSION_DENIED)):
        channel, stub = raw_stub(running.port, _credentials(kit))
        with channel:
            try:
                _, call = stub.Score.with_call(serde.score_request_to_proto(GOOD), timeout=10)
            except grpc.RpcError as error:
                call = error
            assert call.code() == expected
            (value,) = [v for k, v in call.trailing_metadata() if k == CHECKPOINT_METADATA]
        checkpoint = verify_checkpoint(serde.checkpoint_from_proto(silo_pb2.SignedCheckpoint.FromString(value)),
                                       [kits["silo"].certificate()])
        assert checkpoint.log == "mor://silo/hospital-a"
        assert checkpoint.size == audit.size  # the tree head includes this very call's entry
        assert logged(audit)[-1]["status"] == expected.name
    still_serves(running.port, kits)


class _FailingOnce:
    """An audit sink whose first write fails (a full disk), then recovers."""

    def __init__(self, log: AuditLog) -> None:
        self.log, self.failed = log, False

    def record(self, event):
        if not self.failed:
            self.failed = True
            raise OSError("disk full")
        return self.log.record(event)

    def latest_checkpoint(self):
        return self.log.latest_checkpoint()


def test_a_call_that_cannot_be_recorded_is_not_answered(consortium_pki, tmp_path: Path) -> None:
    ca, _, kits = consortium_pki
    log = AuditLog.for_kit(tmp_path / "audit.db", kits["silo"], checkpoint_every_entries=1)
    running, _ = start(ca, kits["silo"], tmp_path, audit=_FailingOnce(log))
    try:
        with pytest.raises(SiloError, match="could not record the call in its audit log") as caught:
            client(running.port, kits["coordinator"]).score(GOOD)
        assert caught.value.code == ErrorCode.INTERNAL
        still_serves(running.port, kits)
        assert [e["status"] for e in logged(log)] == ["OK"]  # only the answered call is on record
    finally:
        running.stop(0)
        log.close()


class _HandlerThatEndsCalls(silo_pb2_grpc.SiloRewardServiceServicer):
    """Score aborts with its own status; every other RPC is the generated stub's (sets UNIMPLEMENTED, raises)."""

    def Score(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the model is still loading")


def test_the_status_a_handler_ends_a_call_with_is_the_one_answered_and_on_record(consortium_pki,
                                                                                tmp_path: Path) -> None:
    """A handler's own status (abort, set_code) is not turned into INTERNAL, and the entry says what was answered."""
    ca, _, kits = consortium_pki
    audit = AuditLog.for_kit(tmp_path / "audit.db", kits["silo"], checkpoint_every_entries=1)
    running = serve(kit=kits["silo"], crl_path=ca.directory / "crl.pem", roles_by_rpc=ROLES_BY_RPC,
                    services=[(silo_pb2_grpc.add_SiloRewardServiceServicer_to_server, _HandlerThatEndsCalls(),
                               SERVICE_NAME)], admission=SiloAdmission(SiloPolicy()), audit=audit)
    running.set_serving(True)
    try:
        channel, stub = raw_stub(running.port, _credentials(kits["coordinator"]))
        with channel:
            with pytest.raises(grpc.RpcError) as aborted:
                stub.Score(serde.score_request_to_proto(GOOD), timeout=10)
            assert aborted.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert aborted.value.details() == "the model is still loading"
            assert rpc_code(stub.Describe, silo_pb2.DescribeRequest()) == grpc.StatusCode.UNIMPLEMENTED
            health = health_pb2_grpc.HealthStub(channel)
            assert rpc_code(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service")) == \
                grpc.StatusCode.NOT_FOUND  # set_code, then a normal return
            assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING  # and the server still serves
        entries = [(e["rpc"].rsplit("/", 1)[1], e["decision"], e["status"], e["reason"]) for e in logged(audit)]
        assert entries == [("Score", "failed", "FAILED_PRECONDITION", "the model is still loading"),
                           ("Describe", "failed", "UNIMPLEMENTED", "Method not implemented!"),
                           ("Check", "admitted", "NOT_FOUND", ""),
                           ("Check", "admitted", "OK", "")]
    finally:
        running.stop(0)
        audit.close()
