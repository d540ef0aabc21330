"""The consortium's certificate authority: create it, issue party kits, revoke certificates, publish the CRL.

All X.509 work is `cryptography`'s. Keys are ECDSA P-256 with SHA-256
signatures (TLS 1.3's mandatory-to-implement signature scheme, RFC 8446
§9.1). A leaf certificate is valid for both TLS server and client
authentication, since a silo serves and the coordinator is a client, and
names its party in one SAN URI, in a DNS name under the reserved `.invalid`
domain that clients pin (so a connection reaches the party it meant to, not
any consortium member listening at that address), and the hosts a server
answers on.

    <ca>/ca.pem       CA certificate          <ca>/ca.key     its key (0600, unencrypted PKCS8: keep it offline)
    <ca>/issued.json  every certificate issued, with its serial and status
    <ca>/crl.pem      the signed CRL (rewritten on every revocation)
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import MISSING, asdict, dataclass, fields
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .files import make_private_directory, write_private, write_public
from .identity import PartyIdentity, check_hosts, parse_identity
from .kits import (CA_FILE, CERT_FILE, CRL_FILE, KEY_FILE, CertKit, crl_number, identity_of, not_a_kits_own,
                   undo_killed_renewal)

CA_KEY_FILE = "ca.key"
ISSUED_FILE = "issued.json"
# Held while issued.json or the CRL is read and rewritten: two `mor pki` commands at once would lose a row.
LOCK_FILE = ".lock"
# A CA outlives many leaf renewals; leaves are short-lived so a stolen key expires soon even unrevoked.
CA_LIFETIME = dt.timedelta(days=5 * 365)
LEAF_LIFETIME = dt.timedelta(days=90)
# Relying parties treat a CRL past its next update as stale; `mor pki revoke` and `mor pki crl` renew it.
CRL_LIFETIME = dt.timedelta(days=7)
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class IssuedCertificate:
    """One line of issued.json."""

    serial: int
    identity: str
    not_before: str
    not_after: str
    kit: str
    revoked_at: str | None = None
    revocation_reason: str | None = None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertificateAuthority:
    """An existing CA directory (`create` makes one); its key is read only to sign, so `issued` works offline."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not (self.directory / CA_FILE).is_file():
            raise FileNotFoundError(f"{self.directory}: no consortium CA here (no ca.pem); create one with "
                                    "`mor pki init`")
        self.certificate = x509.load_pem_x509_certificate((self.directory / CA_FILE).read_bytes())

    @cached_property
    def _key(self) -> ec.EllipticCurvePrivateKey:
        """ca.key, read at the first signature and checked to be ca.pem's."""
        path = self.directory / CA_KEY_FILE
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"ca.key not found in {self.directory}; bring the CA key back to issue, revoke "
                                    "or sign a CRL") from None
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except TypeError:  # cryptography's answer to an encrypted key read without a password
            raise ValueError(f"{path} is encrypted, and `mor pki` has no passphrase support: it reads the "
                             "unencrypted PKCS8 key `mor pki init` wrote; put that back (mode 0600) and protect it "
                             "by keeping it offline") from None
        # A ca.pem from another CA would sign kits that verify against no one's ca.pem, theirs included.
        if key.public_key() != self.certificate.public_key():
            raise ValueError(f"{path} is not the key of {self.directory / CA_FILE} (their public keys differ); put "
                             "back this CA's own pair")
        return key

    @classmethod
    def create(cls, directory: str | Path, *, name: str = "mor-secure consortium CA",
               lifetime: dt.timedelta = CA_LIFETIME) -> CertificateAuthority:
        """A new self-signed CA; refused if `directory` already holds one (its key is never overwritten)."""
        directory = Path(directory)
        # ca.pem and issued.json too: with its key kept offline, a CA is still there, and its record irreplaceable.
        if any((directory / name).exists() for name in (CA_KEY_FILE, CA_FILE, ISSUED_FILE)):
            raise FileExistsError(f"{directory} already holds a CA; a consortium has one CA (use it, or choose "
                                  "another directory)")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        certificate = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        make_private_directory(directory)
        write_private(directory / CA_KEY_FILE, _pem_key(key))
        write_public(directory / CA_FILE, certificate.public_bytes(serialization.Encoding.PEM))
        write_public(directory / ISSUED_FILE, b"[]\n")
        authority = cls(directory)
        authority.write_crl()
        return authority

    # --- issued certificates ------------------------------------------------------------
    def issued(self) -> list[IssuedCertificate]:
        """Every certificate this CA issued, oldest first; ValueError naming the row of a file that is not one."""
        path = self.directory / ISSUED_FILE
        try:
            rows = json.loads(path.read_text("utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path} is not JSON ({exc}); restore it from a backup") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path} holds a JSON {type(rows).__name__}, not the list of certificates `mor pki` "
                             "writes; restore it from a backup")
        return [_issued_row(row, number, path) for number, row in enumerate(rows, start=1)]

    def live_certificates(self, identity: PartyIdentity) -> list[IssuedCertificate]:
        """The certificates of `identity` neither revoked nor expired, oldest first."""
        return _live(self.issued(), identity)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        # A sidecar file: issued.json and the CRL are replaced on every write, so a lock on their inode
        # would not exclude the next writer (as the privacy ledger's lock).
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _record(self, rows: Sequence[IssuedCertificate]) -> None:
        write_public(self.directory / ISSUED_FILE, (json.dumps([asdict(r) for r in rows], indent=2) + "\n").encode())

    def issue(self, identity: PartyIdentity, kit_dir: str | Path, *, lifetime: dt.timedelta = LEAF_LIFETIME,
              hosts: Sequence[str] = DEFAULT_HOSTS, renew: bool = False, refuse_second_live_kit: bool = False,
              not_before: dt.datetime | None = None) -> CertKit:
        """Write a kit for `identity` into `kit_dir`, its certificate naming `hosts` besides the party itself.

        The leaf must expire before the CA does (a certificate outliving its
        issuer cannot be verified). `renew` replaces an existing kit's
        certificate and key, keeping the old key as party-retired-<serial>.key;
        without it an existing kit is refused, and so is renewing a kit that
        belongs to another party. `refuse_second_live_kit` (`mor pki issue`
        sets it) refuses a party that has a live certificate in another kit
        directory: two live kits of one party are two keys to revoke, one of
        them easily forgotten. The certificate is recorded in issued.json
        before the kit is written, so that one signed is always listed and
        revocable; a kit that cannot be written is left as it was. `not_before`
        (default: now) exists for tests and rotation drills (e.g. an already
        expired kit, or a party's second kit).
        """
        kit_dir = Path(kit_dir)
        start = (not_before or _now()) - dt.timedelta(minutes=5)  # tolerate clock skew between parties
        end = start + lifetime
        if end > self.certificate.not_valid_after_utc:
            raise ValueError(f"a certificate valid until {end:%Y-%m-%d} would outlive the CA "
                             f"(valid until {self.certificate.not_valid_after_utc:%Y-%m-%d}); choose a shorter "
                             "lifetime")
        renewed_serial = self._kit_to_replace(identity, kit_dir, renew)
        check_hosts(hosts)
        # The directory before the certificate: one that cannot be made (a read-only parent, a link to nowhere)
        # fails before anything is signed, not with a signed certificate on record for a kit that never existed.
        made_directory = make_private_directory(kit_dir)  # 0700: it holds party.key
        try:
            key = ec.generate_private_key(ec.SECP256R1())
            with self._exclusive():  # checked and recorded under one lock: two issues at once cannot both pass
                rows = self.issued()
                if refuse_second_live_kit:
                    self._refuse_live_kit_elsewhere(identity, kit_dir, rows, renewed_serial)
                certificate = self._sign_leaf(identity, key, hosts, start, end)
                self._record([*rows, IssuedCertificate(
                    serial=certificate.serial_number, identity=identity.uri, not_before=start.isoformat(),
                    not_after=end.isoformat(), kit=str(kit_dir.resolve()))])
            self._write_kit(kit_dir, key, certificate, renewed_serial)
        except BaseException:
            if made_directory:
                with suppress(OSError):  # not empty: someone else wrote there meanwhile, so it is not all ours
                    kit_dir.rmdir()
            raise
        # Not CertKit.load: its refusal of a secret others may read (a renewed kit's other old files) would come
        # after the certificate was signed and the kit written, and leave the renewal half done.
        return CertKit(kit_dir)

    def _refuse_live_kit_elsewhere(self, identity: PartyIdentity, kit_dir: Path, rows: Sequence[IssuedCertificate],
                                   renewed_serial: int | None) -> None:
        # The renewed kit's own certificate is not elsewhere, wherever it was recorded (a CA or kit directory moved
        # since, or storage mounted at another path).
        elsewhere = [row for row in _live(rows, identity)
                     if Path(row.kit) != kit_dir.resolve() and row.serial != renewed_serial]
        if not elsewhere:
            return
        held = "; ".join(f"serial {row.serial:x} in {row.kit}, valid until {row.not_after[:10]}" for row in elsewhere)
        revocations = ", ".join(f"`mor pki revoke --ca {self.directory} --serial {row.serial:x}`" for row in elsewhere)
        raise FileExistsError(f"{identity} already has a live kit ({held}); a party holds one kit: renew it there "
                              f"(`mor pki issue --ca {self.directory} --role {identity.role.value} --name "
                              f"{identity.name} --renew --out {elsewhere[-1].kit}`), or revoke it first "
                              f"({revocations}) if it is lost or no longer used")

    def _kit_to_replace(self, identity: PartyIdentity, kit_dir: Path, renew: bool) -> int | None:
        """The serial of the kit in `kit_dir` that `issue` renews (None for a new kit); refuses any other kit."""
        # Checked before anything is signed: the kit's write would fail only after its certificate was recorded.
        if kit_dir.is_symlink() and not kit_dir.exists():
            raise FileNotFoundError(f"--out {kit_dir} is a symbolic link to {os.readlink(kit_dir)}, which does not "
                                    "exist; name the kit's real directory")
        if not next(path for path in (kit_dir, *kit_dir.parents) if path.exists()).is_dir():
            raise NotADirectoryError(f"--out {kit_dir} is a file, not a directory" if kit_dir.exists() else
                                     f"--out {kit_dir} is under a file, not a directory")
        resolved, ca_directory = kit_dir.resolve(), self.directory.resolve()
        if resolved == ca_directory or ca_directory in resolved.parents:
            raise ValueError(f"kit directory {kit_dir} is in the CA directory {self.directory}, which holds the "
                             "CA's key and is never handed out; choose one outside it, e.g. pki/kits/<role>-<name>")
        if resolved in ca_directory.parents:
            raise ValueError(f"kit directory {kit_dir} holds the CA directory {self.directory}, and a kit is handed "
                             "out whole; give the kit a directory of its own, e.g. pki/kits/<role>-<name>")
        if not ((kit_dir / KEY_FILE).exists() or (kit_dir / CERT_FILE).exists()):
            if held := not_a_kits_own(kit_dir):
                raise FileExistsError(f"kit directory {kit_dir} is not empty (it holds {', '.join(held[:5])}"
                                      f"{', ...' if len(held) > 5 else ''}), and a kit is handed out whole, so "
                                      "anything there would go with it (other parties' kits, say); give the kit a "
                                      "new or empty directory of its own")
            if renew:
                raise FileNotFoundError(f"no kit in {kit_dir} to renew; drop --renew to issue a new one")
            return None
        if not renew:
            raise FileExistsError(f"{kit_dir} already holds a kit; renew it with --renew (its old key is retired, "
                                  "never overwritten)")
        current = CertKit(kit_dir).certificate()
        if (holder := identity_of(current)) != identity:
            raise ValueError(f"{kit_dir} holds the kit of {holder}, not {identity}; renew a kit only as the party "
                             "it belongs to (`mor pki list` shows which kit is whose)")
        return current.serial_number

    def _sign_leaf(self, identity: PartyIdentity, key: ec.EllipticCurvePrivateKey, hosts: Sequence[str],
                   start: dt.datetime, end: dt.datetime) -> x509.Certificate:
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri), x509.DNSName(identity.tls_name)]
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.role.value),
                                     x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def _write_kit(self, kit_dir: Path, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate,
                   renewed_serial: int | None) -> None:
        """Put the kit's files in place; on any failure, remove the ones this call added and restore the old key."""
        key_path, pending_key = kit_dir / KEY_FILE, kit_dir / f"{KEY_FILE}.new"
        pending_key.unlink(missing_ok=True)  # left by a renewal killed before it moved it in place: never in use
        added = [p for p in (kit_dir / CA_FILE, kit_dir / CRL_FILE, key_path, kit_dir / CERT_FILE) if not p.exists()]
        retired = (kit_dir / f"party-retired-{renewed_serial:x}.key"
                   if renewed_serial is not None and key_path.exists() else None)
        if retired is not None and retired.exists():
            undo_killed_renewal(key_path, retired, CertKit(kit_dir).certificate())
        retired_linked = key_replaced = False
        try:
            write_public(kit_dir / CA_FILE, (self.directory / CA_FILE).read_bytes())
            write_public(kit_dir / CRL_FILE, (self.directory / CRL_FILE).read_bytes())
            write_private(pending_key, _pem_key(key))
            if retired is not None:
                os.link(key_path, retired)  # a second name, so that party.key is replaced in one step, never absent
                retired_linked = True
                os.chmod(retired, 0o600)  # the old key was perhaps readable by others (why it is renewed)
            os.replace(pending_key, key_path)
            key_replaced = True
            # Key first, then certificate: a server reloading between the two sees a mismatched pair and keeps its
            # old one.
            write_public(kit_dir / CERT_FILE, certificate.public_bytes(serialization.Encoding.PEM))
        except BaseException:
            pending_key.unlink(missing_ok=True)
            if retired_linked and key_replaced:
                os.replace(retired, key_path)  # the old key back in place
            elif retired_linked:
                retired.unlink()  # the old key never left party.key
            for path in added:
                path.unlink(missing_ok=True)
            raise

    # --- revocation ---------------------------------------------------------------------
    def revoke(self, *, serial: int | None = None, identity: str | None = None,
               reason: str = "unspecified") -> list[int]:
        """Revoke one certificate (by serial) or every live one of a party (by identity URI); rewrite the CRL."""
        if (serial is None) == (identity is None):
            raise ValueError("revoke needs exactly one of serial or identity")
        if identity is not None:
            identity = parse_identity(identity).uri
        with self._exclusive():
            rows = self.issued()
            chosen = [r for r in rows if r.revoked_at is None and (r.serial == serial or r.identity == identity)]
            if not chosen:
                which = f"serial {serial:x}" if serial is not None else identity
                raise ValueError(f"no unrevoked certificate with {which}; "
                                 "`mor pki list` shows what was issued")
            now = _now().isoformat()
            serials = {r.serial for r in chosen}
            revoked = [IssuedCertificate(**{**asdict(r), "revoked_at": now, "revocation_reason": reason})
                       if r.serial in serials else r for r in rows]
            # issued.json first, so no CRL ever lists a serial it does not (the next `mor pki crl`, signed from
            # it, would un-revoke that one). A CRL that cannot be written puts issued.json back, so the
            # revocation can be run again (it used to stay revoked on paper only, and a retry found nothing).
            self._record(revoked)
            try:
                self._write_crl(CRL_LIFETIME, revoked)
            except BaseException:
                self._record(rows)
                raise
        return sorted(serials)

    def write_crl(self, *, lifetime: dt.timedelta = CRL_LIFETIME) -> Path:
        """Sign and publish the CRL of every revoked serial (atomically replaced), numbered above the last."""
        with self._exclusive():
            return self._write_crl(lifetime, self.issued())

    def _write_crl(self, lifetime: dt.timedelta, rows: Sequence[IssuedCertificate]) -> Path:
        now = _now()
        path = self.directory / CRL_FILE
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.certificate.subject)
                   .last_update(now).next_update(now + lifetime)
                   .add_extension(x509.CRLNumber(_next_crl_number(path)), critical=False))
        for row in rows:
            if row.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(row.serial)
                    .revocation_date(dt.datetime.fromisoformat(row.revoked_at)).build())
        crl = builder.sign(self._key, hashes.SHA256())
        write_public(path, crl.public_bytes(serialization.Encoding.PEM))
        return path


def _live(rows: Sequence[IssuedCertificate], identity: PartyIdentity) -> list[IssuedCertificate]:
    now = _now()
    return [row for row in rows if row.identity == identity.uri and row.revoked_at is None
            and dt.datetime.fromisoformat(row.not_after) > now]


_ROW_FIELDS = {field.name: field.default is MISSING for field in fields(IssuedCertificate)}  # name: required
_ROW_TIMES = ("not_before", "not_after", "revoked_at")


def _issued_row(row: object, number: int, path: Path) -> IssuedCertificate:
    """Row `number` (from 1) of issued.json, checked: a hand-edited or older file fails naming the row."""
    def wrong(what: str) -> ValueError:
        return ValueError(f"{path}: row {number} {what}; every row has {', '.join(_ROW_FIELDS)} (the last two "
                          "null unless revoked): mend it or restore the file from a backup")

    if not isinstance(row, dict):
        raise wrong(f"is a JSON {type(row).__name__}, not an object")
    if missing := [name for name, required in _ROW_FIELDS.items() if required and name not in row]:
        raise wrong(f"has no {', '.join(missing)}")
    if unknown := sorted(set(row) - set(_ROW_FIELDS)):
        raise wrong(f"has unknown {', '.join(unknown)}")
    if type(row["serial"]) is not int or row["serial"] < 1:  # not `isinstance`: True is an int
        raise wrong(f"has serial {row['serial']!r}, not a positive integer")
    for name, required in _ROW_FIELDS.items():
        if name != "serial" and (required or row.get(name) is not None) and not isinstance(row[name], str):
            raise wrong(f"has {name} {row[name]!r}, not a string")
    for name in _ROW_TIMES:
        if row.get(name) is not None:
            try:
                aware = dt.datetime.fromisoformat(row[name]).tzinfo is not None
            except ValueError:
                aware = False
            if not aware:
                raise wrong(f"has {name} {row[name]!r}, not an ISO date and time with its time zone")
    return IssuedCertificate(**row)


def _next_crl_number(path: Path) -> int:
    """Above the last CRL's number and at least the time in microseconds.

    RFC 5280 §5.2.3: a monotonically increasing CRL number, so that a server can refuse an older CRL put back
    in place of a newer one (which would un-revoke). One above the last alone restarted at 1 when the CA's
    crl.pem was lost or restored from an old backup, and every server, holding a higher number, then refused
    the new CRL and kept serving the newly revoked. Microseconds keep growing without the file (lastUpdate
    cannot: two CRLs signed within one second carry the same), and fit the 20 octets RFC 5280 allows.
    """
    last = crl_number(x509.load_pem_x509_crl(path.read_bytes())) if path.is_file() else 0
    return max(last + 1, time.time_ns() // 1000)
