"""The consortium PKI: kits per party, keys 0600 and never overwritten, SAN identities, CRL, renewal."""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

import mor_secure.pki.authority as authority
from mor_cli.main import main
from mor_secure.pki import CertificateAuthority, CertKit, PartyIdentity, Role, identity_of, parse_identity
from mor_secure.pki.kits import crl_number
from mor_secure.transport.revocation import RevocationList


def test_init_issues_one_kit_per_party_of_the_consortium(consortium_path: Path, tmp_path: Path, capsys) -> None:
    assert main(["pki", "init", "--consortium", str(consortium_path), "--out", str(tmp_path / "pki")]) == 0
    kits = sorted(p.name for p in (tmp_path / "pki" / "kits").iterdir())
    assert kits == ["auditor-auditor", "coordinator-coordinator", "silo-bank-b", "silo-hospital-a", "silo-hospital-c"]
    for name in kits:
        kit = CertKit.load(tmp_path / "pki" / "kits" / name)
        assert stat.S_IMODE(kit.key_path.stat().st_mode) == 0o600
        assert kit.identity().uri == "mor://" + name.replace("-", "/", 1)
        certificate = kit.certificate()
        assert certificate.not_valid_after_utc <= kit.ca_certificate().not_valid_after_utc
        certificate.verify_directly_issued_by(kit.ca_certificate())
    assert stat.S_IMODE((tmp_path / "pki" / "ca" / "ca.key").stat().st_mode) == 0o600
    # Running init again never overwrites the CA key.
    ca_key = (tmp_path / "pki" / "ca" / "ca.key").read_bytes()
    assert main(["pki", "init", "--consortium", str(consortium_path), "--out", str(tmp_path / "pki")]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "pki" / "ca" / "ca.key").read_bytes() == ca_key


def test_init_that_fails_part_way_leaves_nothing_behind(consortium_path: Path, tmp_path: Path, capsys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A kit that cannot be issued (here: the disk fills at the third) must not leave a CA with two kits."""
    import mor_cli.pki_cli as pki_cli

    issued, issue = [], CertificateAuthority.issue

    def third_fails(self, identity, *args, **kwargs):
        if len(issued) == 2:
            raise OSError(28, "No space left on device")
        issued.append(identity)
        return issue(self, identity, *args, **kwargs)

    monkeypatch.setattr(pki_cli.CertificateAuthority, "issue", third_fails)
    (tmp_path / "pki").mkdir()
    with pytest.raises(OSError, match="No space left"):
        main(["pki", "init", "--consortium", str(consortium_path), "--out", str(tmp_path / "pki")])
    assert list((tmp_path / "pki").iterdir()) == []  # the empty directory it was given, as it was
    monkeypatch.undo()
    assert main(["pki", "init", "--consortium", str(consortium_path), "--out", str(tmp_path / "pki")]) == 0


def test_an_out_path_under_a_file_is_one_clear_line(consortium_path: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    assert main(["pki", "init", "--consortium", str(consortium_path), "--out", str(tmp_path / "a-file" / "pki")]) == 1
    assert capsys.readouterr().err.startswith("mor pki: error: [Errno 20] Not a directory")


def test_a_consortium_naming_one_auditor_twice_is_refused_before_any_key_is_made(consortium_path: Path,
                                                                                 tmp_path: Path, capsys) -> None:
    doubled = tmp_path / "consortium.yaml"
    doubled.write_text(consortium_path.read_text(encoding="utf-8") + "auditors: [auditor, auditor]\n",
                       encoding="utf-8")
    assert main(["pki", "init", "--consortium", str(doubled), "--out", str(tmp_path / "pki")]) == 1
    assert "auditor names must be unique" in capsys.readouterr().err and not (tmp_path / "pki").exists()


def test_keys_are_never_overwritten_and_renewal_retires_the_old_one(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    identity = PartyIdentity(Role.SILO, "hospital-a")
    first = ca.issue(identity, tmp_path / "kit")
    old_key, old_serial = first.key_path.read_bytes(), first.certificate().serial_number
    with pytest.raises(FileExistsError, match="--renew"):
        ca.issue(identity, tmp_path / "kit")
    assert first.key_path.read_bytes() == old_key
    renewed = ca.issue(identity, tmp_path / "kit", renew=True)
    assert renewed.key_path.read_bytes() != old_key
    assert (tmp_path / "kit" / f"party-retired-{old_serial:x}.key").read_bytes() == old_key
    with pytest.raises(ValueError, match="outlive the CA"):
        ca.issue(PartyIdentity(Role.SILO, "long-lived"), tmp_path / "long", lifetime=dt.timedelta(days=20 * 365))


def test_revocation_is_published_in_a_signed_crl(tmp_path: Path, capsys) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    kit = ca.issue(PartyIdentity(Role.SILO, "hospital-a"), tmp_path / "kit")
    serial = kit.certificate().serial_number
    assert main(["pki", "revoke", "--ca", str(tmp_path / "ca"), "--serial", f"{serial:x}", "--reason", "drill"]) == 0
    crl = x509.load_pem_x509_crl((tmp_path / "ca" / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.certificate.public_key())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert main(["pki", "list", "--ca", str(tmp_path / "ca")]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["pki", "revoke", "--ca", str(tmp_path / "ca"), "--serial", f"{serial:x}"]) == 1  # already revoked
    assert f"no unrevoked certificate with serial {serial:x}" in capsys.readouterr().err
    assert main(["pki", "revoke", "--ca", str(tmp_path / "ca"), "--serial", "zz"]) == 2  # a usage error, one line
    assert "argument --serial: a serial is hexadecimal" in capsys.readouterr().err


def test_every_crl_is_numbered_above_the_last_also_after_the_cas_crl_was_lost(tmp_path: Path) -> None:
    """The number used to be one above crl.pem's: lost or restored from an old backup, it started again below
    what every server held, and the servers refused every later CRL (revocations reached none of them)."""
    ca = CertificateAuthority.create(tmp_path / "ca")
    path = tmp_path / "ca" / "crl.pem"

    def number() -> int:
        return crl_number(x509.load_pem_x509_crl(path.read_bytes()))

    numbers = [number()]
    ca.revoke(serial=ca.issue(PartyIdentity(Role.SILO, "hospital-a"), tmp_path / "kit").certificate().serial_number)
    numbers.append(number())
    assert main(["pki", "crl", "--ca", str(tmp_path / "ca")]) == 0  # within the same second, too
    numbers.append(number())
    old_backup = path.read_bytes()
    ca.write_crl()
    numbers.append(number())
    path.unlink()  # lost
    ca.write_crl()
    numbers.append(number())
    path.write_bytes(old_backup)  # restored from an older backup
    ca.write_crl()
    numbers.append(number())
    assert numbers == sorted(set(numbers)), numbers  # strictly increasing
    assert numbers[0] >= (time.time() - 60) * 1e6  # the signing time in microseconds, not a count from 1


def _crl_signed_by(ca: CertificateAuthority, *, number: int, last_update: dt.datetime,
                   next_update: dt.datetime) -> bytes:
    key = serialization.load_pem_private_key((ca.directory / "ca.key").read_bytes(), password=None)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.certificate.subject)
           .last_update(last_update).next_update(next_update)
           .add_extension(x509.CRLNumber(number), critical=False).sign(key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.PEM)


def test_a_server_does_not_start_on_a_stale_crl_and_logs_one_that_goes_stale(tmp_path: Path, caplog) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    now = dt.datetime.now(dt.timezone.utc)
    newer = crl_number(x509.load_pem_x509_crl((ca.directory / "crl.pem").read_bytes())) + 10**9
    stale = _crl_signed_by(ca, number=newer, last_update=now - dt.timedelta(days=8),
                           next_update=now - dt.timedelta(days=1))
    path = tmp_path / "crl.pem"
    path.write_bytes(stale)
    with pytest.raises(ValueError, match="went stale .* `mor pki crl --ca pki/ca`"):
        RevocationList(path, ca.certificate)
    path.write_bytes((ca.directory / "crl.pem").read_bytes())
    revocations = RevocationList(path, ca.certificate)
    path.write_bytes(stale)  # a newer number, but already past its next update while the server runs
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # same size: mark it changed
    with caplog.at_level(logging.ERROR, logger="mor_secure.transport.revocation"):
        for _ in range(3):
            assert not revocations.is_revoked(1)
    assert [r.getMessage() for r in caplog.records].count(
        f"{path}: the CRL in use went stale at {now.replace(microsecond=0) - dt.timedelta(days=1)}; re-sign it "
        "with `mor pki crl --ca pki/ca` and publish it here") == 1



def test_a_bad_or_missing_crl_is_logged_once_per_version_and_the_last_good_list_stays(tmp_path: Path,
                                                                                     caplog) -> None:
    """A bad file must not make every call a parsed, verified and logged error (a log flood), nor un-revoke."""
    ca = CertificateAuthority.create(tmp_path / "ca")
    serial = ca.issue(PartyIdentity(Role.SILO, "hospital-a"), tmp_path / "kit").certificate().serial_number
    ca.revoke(serial=serial)
    path = tmp_path / "crl.pem"
    path.write_bytes((ca.directory / "crl.pem").read_bytes())
    revocations = RevocationList(path, ca.certificate)

    def errors_over(calls: int) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="mor_secure.transport.revocation"):
            for _ in range(calls):
                assert revocations.is_revoked(serial)
        return [r.getMessage().split(" (")[0] for r in caplog.records]

    path.write_bytes(b"garbage")
    assert errors_over(5) == [f"{path}: CRL rejected"]
    path.unlink()
    assert errors_over(5) == [f"{path}: cannot read the CRL"]
    path.write_bytes(b"other garbage")  # a new version: said again, once
    assert errors_over(5) == [f"{path}: CRL rejected"]
    path.write_bytes((ca.directory / "crl.pem").read_bytes())
    assert errors_over(2) == []
    path.unlink()
    assert errors_over(2) == [f"{path}: cannot read the CRL"]  # said again after a readable spell


def test_identities_are_strict(tmp_path: Path) -> None:
    assert parse_identity("mor://silo/hospital-a") == PartyIdentity(Role.SILO, "hospital-a")
    for bad in ("https://silo/hospital-a", "mor://silo", "mor://janitor/x", "mor://silo/Hospital_A", "mor://silo/a/b",
                "mor://silo/hospital-a\n"):
        with pytest.raises(ValueError):
            parse_identity(bad)
    # The CA certificate has no SAN URI: it speaks for no party.
    with pytest.raises(ValueError, match="names no consortium party"):
        identity_of(CertificateAuthority.create(tmp_path / "ca").certificate)


def test_extra_hosts_may_not_claim_a_partys_pinned_name(tmp_path: Path) -> None:
    """Clients pin a connection by the party's name under mor-secure.invalid; no other kit may carry one."""
    ca = CertificateAuthority.create(tmp_path / "ca")
    identity = PartyIdentity(Role.SILO, "hospital-a")
    for host in ("*.silo.mor-secure.invalid", "bank-b.silo.mor-secure.invalid", "BANK-B.silo.mor-secure.invalid.",
                 "*.example.org"):
        with pytest.raises(ValueError, match="only the party's own identity may carry"):
            ca.issue(identity, tmp_path / f"kit-{len(host)}", hosts=[host])
    kit = ca.issue(identity, tmp_path / "kit", hosts=["silo1.example.org", "10.0.0.5"])
    names = kit.certificate().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "silo1.example.org" in names.get_values_for_type(x509.DNSName)


def test_a_lifetime_under_a_day_is_refused_by_the_cli(tmp_path: Path, capsys) -> None:
    CertificateAuthority.create(tmp_path / "ca")
    code = main(["pki", "issue", "--ca", str(tmp_path / "ca"), "--role", "silo", "--name", "hospital-d",
                 "--out", str(tmp_path / "kit"), "--days", "0"])
    assert code == 2 and "a certificate lifetime is at least 1 day, got 0" in capsys.readouterr().err
    assert not (tmp_path / "kit").exists()



def _issue_kits(ca_dir: str, kits_dir: str, worker: int, count: int) -> None:
    authority = CertificateAuthority(ca_dir)
    for i in range(count):
        authority.issue(PartyIdentity(Role.SILO, f"silo-{worker}-{i}"), Path(kits_dir) / f"{worker}-{i}")


def test_kits_issued_at_once_by_several_processes_are_all_on_record(tmp_path: Path) -> None:
    """issued.json is read, extended and rewritten: two operators' `mor pki issue` at once once lost a row."""
    import multiprocessing

    CertificateAuthority.create(tmp_path / "ca")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_issue_kits, args=(str(tmp_path / "ca"), str(tmp_path / "kits"), w, 15))
               for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    issued = CertificateAuthority(tmp_path / "ca").issued()
    assert len(issued) == 60 and len({row.serial for row in issued}) == 60


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_renewing_another_partys_kit_is_refused_before_anything_is_written(consortium_path: Path, tmp_path: Path,
                                                                            capsys) -> None:
    """Renewing the coordinator's kit as a silo would give the coordinator the silos' HE secret key."""
    assert main(["pki", "init", "--consortium", str(consortium_path), "--out", str(tmp_path / "pki")]) == 0
    coordinator = tmp_path / "pki" / "kits" / "coordinator-coordinator"
    kit_before, ca_before = _files(coordinator), _files(tmp_path / "pki" / "ca")
    capsys.readouterr()
    assert main(["pki", "issue", "--ca", str(tmp_path / "pki" / "ca"), "--role", "silo", "--name", "hospital-a",
                 "--out", str(coordinator), "--renew"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "holds the kit of mor://coordinator/coordinator, not mor://silo/hospital-a" in error
    assert _files(coordinator) == kit_before and _files(tmp_path / "pki" / "ca") == ca_before


def test_a_renewal_cut_short_by_a_full_disk_keeps_the_old_key_and_can_be_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    identity = PartyIdentity(Role.SILO, "hospital-a")
    old = ca.issue(identity, tmp_path / "kit")
    old_key, old_serial = old.key_path.read_bytes(), old.certificate().serial_number

    def full_disk(descriptor: int) -> None:  # the real write_private runs; the disk reports full as it syncs
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ca.issue(identity, tmp_path / "kit", renew=True)
    monkeypatch.undo()
    kit = CertKit.load(tmp_path / "kit")
    assert kit.key_path.read_bytes() == old_key and kit.certificate().serial_number == old_serial
    assert not (tmp_path / "kit" / "party.key.new").exists()
    (tmp_path / "kit" / "party.key.new").write_bytes(b"left by a renewal that was killed")  # never in use
    renewed = ca.issue(identity, tmp_path / "kit", renew=True)
    assert renewed.key_path.read_bytes() != old_key and not (tmp_path / "kit" / "party.key.new").exists()
    assert (tmp_path / "kit" / f"party-retired-{old_serial:x}.key").read_bytes() == old_key


def test_an_out_in_the_ca_directory_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    CertificateAuthority.create(tmp_path / "ca")
    ca_before = _files(tmp_path / "ca")
    for out in (tmp_path / "ca", tmp_path / "ca" / "kit", tmp_path / "ca" / ".." / "ca"):
        assert main(["pki", "issue", "--ca", str(tmp_path / "ca"), "--role", "silo", "--name", "hospital-z",
                     "--out", str(out)]) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "is in the CA directory" in error
    assert _files(tmp_path / "ca") == ca_before and not (tmp_path / "ca" / "kit").exists()


def _disk_full_at(monkeypatch, name: str) -> None:
    """Writing the PKI file `name` fails as on a full disk (the code around the write is under test)."""
    write_public = authority.write_public

    def full(path, data):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_public(path, data)
    monkeypatch.setattr(authority, "write_public", full)


def test_a_kit_that_cannot_be_written_leaves_its_certificate_on_record_and_no_files(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """A CA-signed certificate must be listed (and revocable) even when its kit could not be written."""
    ca = CertificateAuthority.create(tmp_path / "ca")
    identity = PartyIdentity(Role.SILO, "hospital-a")
    fresh, renewed = tmp_path / "fresh", tmp_path / "renewed"
    old = ca.issue(identity, renewed)
    kit_before = _files(renewed)
    _disk_full_at(monkeypatch, "party.pem")
    with pytest.raises(OSError, match="No space left"):
        ca.issue(identity, fresh)
    assert not fresh.exists()  # the directory it made is gone with the files
    with pytest.raises(OSError, match="No space left"):
        ca.issue(identity, renewed, renew=True)
    assert _files(renewed) == kit_before and CertKit.load(renewed).certificate() == old.certificate()
    rows = [row for row in ca.issued() if row.identity == identity.uri]
    assert len(rows) == 3 and all(row.revoked_at is None for row in rows)
    assert sorted(ca.revoke(identity=identity.uri)) == sorted(row.serial for row in rows)


def test_hosts_are_added_to_localhost_and_127_0_0_1(tmp_path: Path, capsys) -> None:
    """The silo guide's grpcurl and openssl commands reach 127.0.0.1 even when a kit names its real host."""
    CertificateAuthority.create(tmp_path / "ca")
    assert main(["pki", "issue", "--ca", str(tmp_path / "ca"), "--role", "silo", "--name", "hospital-d",
                 "--out", str(tmp_path / "kit"), "--host", "silo.example.org", "--host", "localhost"]) == 0
    names = CertKit(tmp_path / "kit").certificate().extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["hospital-d.silo.mor-secure.invalid", "localhost",
                                                       "silo.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


@pytest.mark.parametrize("host", ["", "  ", "silo .example.org"])
def test_an_empty_or_spaced_host_is_refused(tmp_path: Path, capsys, host: str) -> None:
    CertificateAuthority.create(tmp_path / "ca")
    assert main(["pki", "issue", "--ca", str(tmp_path / "ca"), "--role", "silo", "--name", "hospital-d",
                 "--out", str(tmp_path / "kit"), "--host", host]) == 1
    assert f"host {host!r} is empty or has a space" in capsys.readouterr().err
    assert not (tmp_path / "kit").exists()


@pytest.mark.parametrize("command", ["init", "issue"])
def test_a_lifetime_over_a_century_is_a_usage_error(consortium_path: Path, tmp_path: Path, capsys,
                                                     command: str) -> None:
    CertificateAuthority.create(tmp_path / "ca")
    arguments = {"init": ["--consortium", str(consortium_path)],
                 "issue": ["--ca", str(tmp_path / "ca"), "--role", "silo", "--name", "hospital-d"]}[command]
    assert main(["pki", command, *arguments, "--out", str(tmp_path / "out"), "--days", "99999999"]) == 2
    assert "a certificate lifetime is at most 36500 days, got 99999999" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_kit_whose_key_was_moved_away_is_not_overwritten_by_a_plain_issue(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    identity = PartyIdentity(Role.SILO, "hospital-a")
    kit = ca.issue(identity, tmp_path / "kit")
    kit.key_path.rename(tmp_path / "moved.key")
    certificate = kit.cert_path.read_bytes()
    with pytest.raises(FileExistsError, match="already holds a kit; renew it with --renew"):
        ca.issue(identity, tmp_path / "kit")
    assert kit.cert_path.read_bytes() == certificate and not kit.key_path.exists()


_RENEWAL_KILLED_BEFORE_ITS_CERTIFICATE = """
import os, sys
from pathlib import Path
import mor_secure.pki.authority as authority
from mor_secure.pki import CertificateAuthority, PartyIdentity, Role
write_public = authority.write_public
def killed_at_the_certificate(path, data):
    if Path(path).name == "party.pem":
        os._exit(137)  # as SIGKILL or a power cut would: no rollback runs
    write_public(path, data)
authority.write_public = killed_at_the_certificate
CertificateAuthority(sys.argv[1]).issue(PartyIdentity(Role.SILO, "hospital-a"), sys.argv[2], renew=True)
"""


def _key_matches_certificate(kit: CertKit) -> bool:
    key = serialization.load_pem_private_key(kit.key_path.read_bytes(), password=None)
    return key.public_key() == kit.certificate().public_key()


def test_a_renewal_killed_before_its_certificate_is_undone_by_the_retry(tmp_path: Path) -> None:
    """Killed with the new key in place and the old certificate still beside it (a pair that serves nothing), the
    kit used to refuse every retry: the old key's retired name was taken."""
    import subprocess
    import sys

    ca = CertificateAuthority.create(tmp_path / "ca")
    identity = PartyIdentity(Role.SILO, "hospital-a")
    old = ca.issue(identity, tmp_path / "kit")
    old_key, old_serial = old.key_path.read_bytes(), old.certificate().serial_number
    killed = subprocess.run([sys.executable, "-c", _RENEWAL_KILLED_BEFORE_ITS_CERTIFICATE, str(tmp_path / "ca"),
                             str(tmp_path / "kit")], timeout=120, check=False)
    assert killed.returncode == 137
    assert not _key_matches_certificate(CertKit.load(tmp_path / "kit"))  # the state the kill left
    renewed = ca.issue(identity, tmp_path / "kit", renew=True)
    assert _key_matches_certificate(renewed) and renewed.certificate().serial_number != old_serial
    assert (tmp_path / "kit" / f"party-retired-{old_serial:x}.key").read_bytes() == old_key


@pytest.mark.parametrize("out", ["pki", "pki/kits"])
def test_a_kit_directory_holding_the_ca_or_other_kits_is_refused(tmp_path: Path, capsys, out: str) -> None:
    """A kit is handed out whole: one issued into pki/ would hand out the CA's key, into pki/kits every kit."""
    ca = CertificateAuthority.create(tmp_path / "pki" / "ca")
    ca.issue(PartyIdentity(Role.SILO, "bank-b"), tmp_path / "pki" / "kits" / "silo-bank-b")
    before = _files(tmp_path / out)
    assert main(["pki", "issue", "--ca", str(tmp_path / "pki" / "ca"), "--role", "silo", "--name", "hospital-z",
                 "--out", str(tmp_path / out)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and ("holds the CA directory" in error if out == "pki" else
                                       "is not empty (it holds silo-bank-b)" in error)
    assert _files(tmp_path / out) == before
    assert [row.identity for row in ca.issued()] == ["mor://silo/bank-b"]  # nothing signed


def test_a_revocation_whose_crl_cannot_be_written_can_be_retried(tmp_path: Path, monkeypatch) -> None:
    """issued.json used to say revoked before the CRL was written: when that failed, no CRL listed the
    certificate and a retry found "no unrevoked certificate" to revoke."""
    ca = CertificateAuthority.create(tmp_path / "ca")
    serial = ca.issue(PartyIdentity(Role.SILO, "hospital-a"), tmp_path / "kit").certificate().serial_number
    with monkeypatch.context() as disk:
        _disk_full_at(disk, "crl.pem")
        with pytest.raises(OSError, match="No space left"):
            ca.revoke(serial=serial, reason="drill")
    assert [row.revoked_at for row in ca.issued()] == [None]
    assert ca.revoke(serial=serial, reason="drill") == [serial]
    crl = x509.load_pem_x509_crl((tmp_path / "ca" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert ca.issued()[0].revoked_at is not None


def test_a_revocation_that_cannot_be_recorded_publishes_no_crl_listing_it(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A CRL listing a serial issued.json does not would be undone by the next `mor pki crl`, signed from
    issued.json with a higher number: the revoked party served again, silently."""
    from mor_secure.pki import authority as authority_module

    ca = CertificateAuthority.create(tmp_path / "ca")
    serial = ca.issue(PartyIdentity(Role.SILO, "hospital-a"), tmp_path / "kit").certificate().serial_number
    write_public = authority_module.write_public

    def full_disk_for_the_record(path: Path, data: bytes) -> None:
        if path.name == "issued.json":
            raise OSError(28, "No space left on device")
        write_public(path, data)

    monkeypatch.setattr(authority_module, "write_public", full_disk_for_the_record)
    with pytest.raises(OSError, match="No space left"):
        ca.revoke(serial=serial, reason="drill")
    monkeypatch.undo()
    crl = x509.load_pem_x509_crl((tmp_path / "ca" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is None
    assert [row.revoked_at for row in ca.issued()] == [None]
    assert ca.revoke(serial=serial, reason="drill") == [serial]  # and it can be run again

