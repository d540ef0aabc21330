"""`mor pki` on an operator's mistakes and a hostile disk: one live kit per party, the CA key kept offline or
encrypted, a wrong ca.pem, a hand-edited issued.json, file modes under any umask, synced public files."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from mor_cli.main import main
from mor_secure.pki import CertificateAuthority, CertKit, PartyIdentity, Role
from mor_secure.pki import files as pki_files

AUDITOR = PartyIdentity(Role.AUDITOR, "auditor-a")


def _issue(ca: Path, out: Path, *extra: str) -> int:
    return main(["pki", "issue", "--ca", str(ca), "--role", AUDITOR.role.value, "--name", AUDITOR.name,
                 "--out", str(out), *extra])


def _serials(ca: Path) -> list[int]:
    return [row["serial"] for row in json.loads((ca / "issued.json").read_text("utf-8"))]


def test_a_party_with_a_live_kit_elsewhere_is_refused_a_second_one(tmp_path: Path, capsys) -> None:
    """Two live kits of one party are two keys to revoke, and the forgotten copy keeps answering as the party."""
    ca = CertificateAuthority.create(tmp_path / "ca")
    ca.issue(AUDITOR, tmp_path / "expired", lifetime=dt.timedelta(days=1),
             not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30))  # no longer live: no obstacle
    assert _issue(ca.directory, tmp_path / "kit") == 0
    first = ca.issued()[-1]
    capsys.readouterr()
    assert _issue(ca.directory, tmp_path / "copy") == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{AUDITOR} already has a live kit (serial {first.serial:x} in " \
        f"{tmp_path / 'kit'}, valid until {first.not_after[:10]})" in error
    assert f"--renew --out {tmp_path / 'kit'}" in error and f"--serial {first.serial:x}`" in error
    assert not (tmp_path / "copy").exists() and len(ca.issued()) == 2
    assert main(["pki", "revoke", "--ca", str(ca.directory), "--serial", f"{first.serial:x}"]) == 0
    assert _issue(ca.directory, tmp_path / "copy") == 0


def test_a_renewal_says_the_old_certificate_stays_valid_and_how_to_revoke_it(tmp_path: Path, capsys) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    assert _issue(ca.directory, tmp_path / "kit") == 0
    old = ca.issued()[0]
    capsys.readouterr()
    assert _issue(ca.directory, tmp_path / "kit", "--renew") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"renewed {AUDITOR}: serial {ca.issued()[1].serial:x}")
    assert (f"the old certificate {old.serial:x} stays valid until {old.not_after}; if its key may be compromised, "
            f"revoke it: mor pki revoke --ca {ca.directory} --serial {old.serial:x}") in out


def test_an_encrypted_ca_key_is_one_clear_error_and_listing_still_works(tmp_path: Path, capsys) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    key_path = ca.directory / "ca.key"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"passphrase")))
    for command in (["issue", "--ca", str(ca.directory), "--role", "auditor", "--name", "a", "--out",
                     str(tmp_path / "kit")], ["crl", "--ca", str(ca.directory)]):
        assert main(["pki", *command]) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"{key_path} is encrypted" in error and "unencrypted PKCS8" in error
    assert main(["pki", "list", "--ca", str(ca.directory)]) == 0
    assert not (tmp_path / "kit").exists() and _serials(ca.directory) == []


def test_the_ca_key_kept_offline_is_needed_only_to_sign(tmp_path: Path, capsys) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    serial = ca.issue(AUDITOR, tmp_path / "kit").certificate().serial_number
    (ca.directory / "ca.key").rename(tmp_path / "offline.key")
    assert main(["pki", "list", "--ca", str(ca.directory)]) == 0
    assert capsys.readouterr().out.startswith(f"{serial:x}  {AUDITOR}")
    for command in (["issue", "--ca", str(ca.directory), "--role", "silo", "--name", "b", "--out",
                     str(tmp_path / "other")], ["revoke", "--ca", str(ca.directory), "--serial", f"{serial:x}"],
                    ["crl", "--ca", str(ca.directory)]):
        assert main(["pki", *command]) == 1
        assert capsys.readouterr().err == (f"mor pki: error: ca.key not found in {ca.directory}; bring the CA key "
                                           "back to issue, revoke or sign a CRL\n")
    assert _serials(ca.directory) == [serial] and ca.issued()[0].revoked_at is None
    with pytest.raises(FileExistsError, match="already holds a CA"):  # its ca.pem and record are never replaced
        CertificateAuthority.create(ca.directory)


def test_list_shows_an_expired_certificate_as_expired_and_every_kit(tmp_path: Path, capsys) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    ca.issue(PartyIdentity(Role.SILO, "old"), tmp_path / "kits" / "old", lifetime=dt.timedelta(days=1),
             not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30))
    ca.issue(AUDITOR, tmp_path / "kits" / "current")
    assert main(["pki", "list", "--ca", str(ca.directory)]) == 0
    expired, current = capsys.readouterr().out.splitlines()
    old_row, current_row = ca.issued()
    assert f"expired {old_row.not_after}" in expired and "valid" not in expired
    assert f"valid until {current_row.not_after}" in current
    assert expired.endswith(f" kit {tmp_path / 'kits' / 'old'}")
    assert current.endswith(f" kit {tmp_path / 'kits' / 'current'}")


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_modes_do_not_depend_on_the_umask(tmp_path: Path, umask: int) -> None:
    """Under umask 000 the CA directory was writable by anyone; under 077 no other account could read ca.pem."""
    previous = os.umask(umask)
    try:
        CertificateAuthority.create(tmp_path / "ca")
        assert _issue(tmp_path / "ca", tmp_path / "kits" / "auditor-a") == 0
    finally:
        os.umask(previous)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    for directory in (tmp_path / "ca", tmp_path / "kits" / "auditor-a"):
        assert mode(directory) == 0o700
        for path in directory.iterdir():
            assert mode(path) == (0o600 if path.suffix == ".key" or path.name == ".lock" else 0o644), path


def test_an_existing_kit_directory_others_may_write_is_made_private(tmp_path: Path) -> None:
    """An empty --out of mode 0777 stayed 0777: anyone could plant files in the kit (diff review helper-77)."""
    CertificateAuthority.create(tmp_path / "ca")
    (tmp_path / "kit").mkdir()
    os.chmod(tmp_path / "kit", 0o777)
    assert _issue(tmp_path / "ca", tmp_path / "kit") == 0
    assert stat.S_IMODE((tmp_path / "kit").stat().st_mode) == 0o700


def test_a_link_planted_where_a_public_file_is_written_first_is_not_followed(tmp_path: Path) -> None:
    """The file was written first under a fixed name (`.crl.pem.<pid>.partial`), opened without O_EXCL: a link
    planted there by whoever may write the directory had its target overwritten, and the rename put the link in
    place of crl.pem (diff review helper-77)."""
    ca = CertificateAuthority.create(tmp_path / "ca")
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone else's file")
    for pid in (os.getpid(), os.getppid()):
        (ca.directory / f".crl.pem.{pid}.partial").symlink_to(victim)
    ca.write_crl()
    assert victim.read_bytes() == b"someone else's file"
    assert not (ca.directory / "crl.pem").is_symlink() and b"X509 CRL" in (ca.directory / "crl.pem").read_bytes()


def test_a_kit_directory_that_cannot_be_made_is_refused_before_anything_is_signed(tmp_path: Path, capsys) -> None:
    """A link to nowhere as --out failed only when the kit was written, its certificate already on record as
    live, so every later issue of the party was refused as a second kit (diff review helper-77)."""
    CertificateAuthority.create(tmp_path / "ca")
    (tmp_path / "kit").symlink_to(tmp_path / "gone")
    assert _issue(tmp_path / "ca", tmp_path / "kit") == 1
    assert f"--out {tmp_path / 'kit'} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in \
        capsys.readouterr().err
    assert _serials(tmp_path / "ca") == []
    assert _issue(tmp_path / "ca", tmp_path / "kit-2") == 0


def test_a_kit_renews_after_the_pki_directory_was_moved(tmp_path: Path) -> None:
    """issued.json records kits by their path at issue: after `mv pki elsewhere`, --renew in the kit itself was
    refused as a second live kit, at the old path (diff review helper-77)."""
    CertificateAuthority.create(tmp_path / "old" / "ca")
    assert _issue(tmp_path / "old" / "ca", tmp_path / "old" / "kit") == 0
    (tmp_path / "old").rename(tmp_path / "new")
    assert _issue(tmp_path / "new" / "ca", tmp_path / "new" / "kit", "--renew") == 0
    assert _issue(tmp_path / "new" / "ca", tmp_path / "new" / "copy") == 1  # still one live kit per party


@pytest.mark.parametrize("secret", ["party.key", "agreement.key", "he_secret.ctx"])
def test_a_kit_whose_secrets_others_can_read_is_refused_when_loaded(tmp_path: Path, secret: str) -> None:
    """Only the silo's serve checked party.key: the coordinator, and every other secret of a kit, went unchecked
    (helper-78)."""
    ca = CertificateAuthority.create(tmp_path / "ca")
    kit = ca.issue(AUDITOR, tmp_path / "kit")
    if secret != "party.key":
        pki_files.write_private(kit.directory / secret, b"a secret")
    os.chmod(kit.directory / secret, 0o640)
    with pytest.raises(PermissionError, match=rf"{kit.directory / secret}: this private key is mode 0640, open to "
                       rf"users other than its owner \(it must be 0600\): run `chmod 600 {kit.directory / secret}`"):
        CertKit.load(kit.directory)
    os.chmod(kit.directory / secret, 0o600)
    assert CertKit.load(kit.directory).identity() == AUDITOR


def test_a_kit_whose_key_others_could_read_renews_whole(tmp_path: Path) -> None:
    """The remedy the refusal names: renewal hard-links the old key to its retired name, which kept its 0644, so
    the renewal's own CertKit.load refused the kit after signing, and provisioning never ran (diff review
    helper-79)."""
    ca = CertificateAuthority.create(tmp_path / "ca")
    old = ca.issue(AUDITOR, tmp_path / "kit")
    old_serial = old.certificate().serial_number
    os.chmod(old.key_path, 0o644)
    assert _issue(ca.directory, tmp_path / "kit", "--renew") == 0
    retired = tmp_path / "kit" / f"party-retired-{old_serial:x}.key"
    assert stat.S_IMODE(retired.stat().st_mode) == 0o600
    assert CertKit.load(tmp_path / "kit").certificate().serial_number == ca.issued()[-1].serial


def test_an_out_that_is_a_file_is_refused_before_anything_is_signed(tmp_path: Path, capsys) -> None:
    CertificateAuthority.create(tmp_path / "ca")
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    assert _issue(tmp_path / "ca", tmp_path / "a-file") == 1
    assert capsys.readouterr().err == f"mor pki: error: --out {tmp_path / 'a-file'} is a file, not a directory\n"
    assert _issue(tmp_path / "ca", tmp_path / "a-file" / "kit") == 1
    assert f"--out {tmp_path / 'a-file' / 'kit'} is under a file" in capsys.readouterr().err
    assert _serials(tmp_path / "ca") == []


def test_a_ca_pem_that_is_not_the_keys_certificate_is_refused(tmp_path: Path, capsys) -> None:
    """Kits signed so would verify against no ca.pem, their own included."""
    CertificateAuthority.create(tmp_path / "ca")
    other = CertificateAuthority.create(tmp_path / "other")
    (tmp_path / "ca" / "ca.pem").write_bytes((other.directory / "ca.pem").read_bytes())
    assert _issue(tmp_path / "ca", tmp_path / "kit") == 1
    assert (f"{tmp_path / 'ca' / 'ca.key'} is not the key of {tmp_path / 'ca' / 'ca.pem'} (their public keys "
            "differ)") in capsys.readouterr().err
    assert not (tmp_path / "kit").exists() and _serials(tmp_path / "ca") == []


_ROW = {"serial": 1, "identity": "mor://silo/a", "not_before": "2025-01-01T00:00:00+00:00",
        "not_after": "2025-04-01T00:00:00+00:00", "kit": "/kits/a"}


@pytest.mark.parametrize(("content", "says"), [
    (json.dumps([{"serial": 1, "identity": "mor://silo/a"}]), "row 1 has no not_before, not_after, kit"),
    (json.dumps({"serial": 1}), "holds a JSON dict, not the list"),
    (json.dumps([_ROW, [1]]), "row 2 is a JSON list, not an object"),
    (json.dumps([{**_ROW, "serial": "1"}]), "row 1 has serial '1', not a positive integer"),
    (json.dumps([{**_ROW, "kit": None}]), "row 1 has kit None, not a string"),
    (json.dumps([{**_ROW, "not_after": "next spring"}]), "row 1 has not_after 'next spring', not an ISO date"),
    (json.dumps([{**_ROW, "revoked_at": "2025-02-01T00:00:00"}]), "row 1 has revoked_at '2025-02-01T00:00:00'"),
    (json.dumps([{**_ROW, "owner": "x"}]), "row 1 has unknown owner"),
    ("[{", "is not JSON"),
])
def test_a_hand_edited_issued_json_is_one_clear_error(tmp_path: Path, capsys, content: str, says: str) -> None:
    CertificateAuthority.create(tmp_path / "ca")
    (tmp_path / "ca" / "issued.json").write_text(content, encoding="utf-8")
    assert main(["pki", "list", "--ca", str(tmp_path / "ca")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"mor pki: error: {tmp_path / 'ca' / 'issued.json'}")
    assert says in error


def test_renewing_a_directory_with_no_kit_is_refused(tmp_path: Path, capsys) -> None:
    """A typo in --out used to issue a fresh kit and report it "renewed", the real kit left on its old key."""
    CertificateAuthority.create(tmp_path / "ca")
    assert _issue(tmp_path / "ca", tmp_path / "typo", "--renew") == 1
    assert capsys.readouterr().err == (f"mor pki: error: no kit in {tmp_path / 'typo'} to renew; drop --renew to "
                                       "issue a new one\n")
    assert not (tmp_path / "typo").exists() and _serials(tmp_path / "ca") == []


def test_public_files_are_synced_before_their_rename_and_their_directory_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Renamed unsynced, a power cut could leave issued.json (every certificate on record) an empty file."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(descriptor: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def recorded_replace(source, destination) -> None:
        events.append(("replace", str(destination)))
        replace(source, destination)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    path = tmp_path / "issued.json"
    pki_files.write_public(path, b"[]\n")
    (synced_partial, partial), renamed, synced_directory = events
    assert synced_partial == "fsync" and re.fullmatch(rf"{re.escape(str(tmp_path))}/\.issued\.json\.\w+\.partial",
                                                      partial)
    assert (renamed, synced_directory) == (("replace", str(path)), ("fsync", str(tmp_path)))
    assert path.read_bytes() == b"[]\n" and os.listdir(tmp_path) == ["issued.json"]


@pytest.mark.parametrize("host", ["a/b", "127.0.0.1/8", ".", "a..b", "-x", "silo.example.org:8443",
                                  "bücher.example", "fe80::1%eth0", "mor://coordinator/coordinator", "a_b.example"])
def test_a_host_that_is_neither_an_ip_address_nor_a_host_name_is_refused(tmp_path: Path, capsys, host: str) -> None:
    CertificateAuthority.create(tmp_path / "ca")
    assert _issue(tmp_path / "ca", tmp_path / "kit", f"--host={host}") == 1
    assert f"host {host!r} is neither an IP address nor a host name" in capsys.readouterr().err
    assert not (tmp_path / "kit").exists() and _serials(tmp_path / "ca") == []


def test_ip_addresses_and_host_names_in_any_case_are_accepted(tmp_path: Path) -> None:
    CertificateAuthority.create(tmp_path / "ca")
    assert _issue(tmp_path / "ca", tmp_path / "kit", "--host=::1", "--host=10.0.0.5", "--host=Silo-1.Example.org",
                  "--host=xn--bcher-kva.example") == 0
