"""The consortium's certificate authority: create it, issue party kits, revoke certificates, publish the CRL.

All X.509 work is `cryptography`'s. Keys are ECDSA P-256 with SHA-256
signatures (TLS 1.3's mandatory-to-implement signature scheme, RFC 8446
§9.1). A leaf certificate is valid for both TLS server and client
authentication, since a silo serves and the coordinator is a client, and
names its party in one SAN URI, in a DNS name under the reserved `.invalid`
domain that clients pin (so a connection reaches the party it meant to, not
any consortium member listening at that address), and the hosts a server
answers on.

    <ca>/ca.pem       CA certificate          <ca>/ca.key     its key (0600)
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
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .files import write_private, write_public
from .identity import IDENTITY_DOMAIN, PartyIdentity, parse_identity
from .kits import CA_FILE, CERT_FILE, CRL_FILE, KEY_FILE, CertKit, crl_number, identity_of

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
    """An existing CA directory (`create` makes one)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not (self.directory / CA_FILE).is_file() or not (self.directory / CA_KEY_FILE).is_file():
            raise FileNotFoundError(f"{self.directory}: no consortium CA here (ca.pem and ca.key); create one with "
                                    "`mor pki init`")
        self.certificate = x509.load_pem_x509_certificate((self.directory / CA_FILE).read_bytes())
        self._key = serialization.load_pem_private_key((self.directory / CA_KEY_FILE).read_bytes(), password=None)

    @classmethod
    def create(cls, directory: str | Path, *, name: str = "mor-secure consortium CA",
               lifetime: dt.timedelta = CA_LIFETIME) -> CertificateAuthority:
        """A new self-signed CA; refused if `directory` already holds one (its key is never overwritten)."""
        directory = Path(directory)
        if (directory / CA_KEY_FILE).exists():
            raise FileExistsError(f"{directory} already holds a CA key; a consortium has one CA (use it, or choose "
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
        write_private(directory / CA_KEY_FILE, _pem_key(key))
        write_public(directory / CA_FILE, certificate.public_bytes(serialization.Encoding.PEM))
        write_public(directory / ISSUED_FILE, b"[]\n")
        authority = cls(directory)
        authority.write_crl()
        return authority

    # --- issued certificates ------------------------------------------------------------
    def issued(self) -> list[IssuedCertificate]:
        """Every certificate this CA issued, oldest first."""
        return [IssuedCertificate(**row) for row in json.loads((self.directory / ISSUED_FILE).read_text("utf-8"))]

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
              hosts: Sequence[str] = DEFAULT_HOSTS, renew: bool = False,
              not_before: dt.datetime | None = None) -> CertKit:
        """Write a kit for `identity` into `kit_dir`, its certificate naming `hosts` besides the party itself.

        The leaf must expire before the CA does (a certificate outliving its
        issuer cannot be verified). `renew` replaces an existing kit's
        certificate and key, keeping the old key as party-retired-<serial>.key;
        without it an existing kit is refused, and so is renewing a kit that
        belongs to another party. The certificate is recorded in issued.json
        before the kit is written, so that one signed is always listed and
        revocable; a kit that cannot be written is left as it was. `not_before`
        (default: now) exists for tests and rotation drills (e.g. an already
        expired kit).
        """
        kit_dir = Path(kit_dir)
        start = (not_before or _now()) - dt.timedelta(minutes=5)  # tolerate clock skew between parties
        end = start + lifetime
        if end > self.certificate.not_valid_after_utc:
            raise ValueError(f"a certificate valid until {end:%Y-%m-%d} would outlive the CA "
                             f"(valid until {self.certificate.not_valid_after_utc:%Y-%m-%d}); choose a shorter "
                             "lifetime")
        renewed_serial = self._kit_to_replace(identity, kit_dir, renew)
        _check_hosts(hosts)
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = self._sign_leaf(identity, key, hosts, start, end)
        with self._exclusive():
            self._record([*self.issued(), IssuedCertificate(
                serial=certificate.serial_number, identity=identity.uri, not_before=start.isoformat(),
                not_after=end.isoformat(), kit=str(kit_dir.resolve()))])
        self._write_kit(kit_dir, key, certificate, renewed_serial)
        return CertKit.load(kit_dir)

    def _kit_to_replace(self, identity: PartyIdentity, kit_dir: Path, renew: bool) -> int | None:
        """The serial of the kit in `kit_dir` that `issue` renews (None for a new kit); refuses any other kit."""
        resolved, ca_directory = kit_dir.resolve(), self.directory.resolve()
        if resolved == ca_directory or ca_directory in resolved.parents:
            raise ValueError(f"kit directory {kit_dir} is in the CA directory {self.directory}, which holds the "
                             "CA's key and is never handed out; choose one outside it, e.g. pki/kits/<role>-<name>")
        if resolved in ca_directory.parents:
            raise ValueError(f"kit directory {kit_dir} holds the CA directory {self.directory}, and a kit is handed "
                             "out whole; give the kit a directory of its own, e.g. pki/kits/<role>-<name>")
        if not ((kit_dir / KEY_FILE).exists() or (kit_dir / CERT_FILE).exists()):
            if held := _not_a_kits_own(kit_dir):
                raise FileExistsError(f"kit directory {kit_dir} is not empty (it holds {', '.join(held[:5])}"
                                      f"{', ...' if len(held) > 5 else ''}), and a kit is handed out whole, so "
                                      "anything there would go with it (other parties' kits, say); give the kit a "
                                      "new or empty directory of its own")
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
        made_directory = not kit_dir.exists()
        kit_dir.mkdir(parents=True, exist_ok=True)
        key_path, pending_key = kit_dir / KEY_FILE, kit_dir / f"{KEY_FILE}.new"
        pending_key.unlink(missing_ok=True)  # left by a renewal killed before it moved it in place: never in use
        added = [p for p in (kit_dir / CA_FILE, kit_dir / CRL_FILE, key_path, kit_dir / CERT_FILE) if not p.exists()]
        retired = (kit_dir / f"party-retired-{renewed_serial:x}.key"
                   if renewed_serial is not None and key_path.exists() else None)
        if retired is not None and retired.exists():
            _undo_killed_renewal(key_path, retired, CertKit(kit_dir).certificate())
        retired_linked = key_replaced = False
        try:
            write_public(kit_dir / CA_FILE, (self.directory / CA_FILE).read_bytes())
            write_public(kit_dir / CRL_FILE, (self.directory / CRL_FILE).read_bytes())
            write_private(pending_key, _pem_key(key))
            if retired is not None:
                os.link(key_path, retired)  # a second name, so that party.key is replaced in one step, never absent
                retired_linked = True
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
            if made_directory:
                with suppress(OSError):  # not empty: someone else wrote there meanwhile, so it is not all ours
                    kit_dir.rmdir()
            raise

    # --- revocation ---------------------------------------------------------------------
    def revoke(self, *, serial: int | None = None, identity: str | None = None, reason: str = "unspecified") -> list[int]:
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


def _not_a_kits_own(kit_dir: Path) -> list[str]:
    """What `kit_dir` holds besides what an issue killed there could have left (a fresh kit's public files, its
    pending key, their partial writes)."""
    if not kit_dir.is_dir():
        return []
    own = (CA_FILE, CRL_FILE, CERT_FILE, f"{KEY_FILE}.new")
    return sorted(p.name for p in kit_dir.iterdir() if p.name not in own and not any(
        p.name.startswith(f".{name}.") and p.name.endswith(".partial") for name in own))


def _undo_killed_renewal(key_path: Path, retired: Path, certificate: x509.Certificate) -> None:
    """Put a kit a renewal was killed in back on its old key, so the renewal can run again.

    Killed after the old key got its retired name: party.key is still the old key (drop the spare name), or
    already the new one while party.pem is still the old certificate (a mismatched pair: the old key goes back).
    """
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if key.public_key() == certificate.public_key():
        retired.unlink()
    else:
        os.replace(retired, key_path)


def _check_hosts(hosts: Sequence[str]) -> None:
    for host in hosts:
        if not host or any(character.isspace() for character in host):
            raise ValueError(f"host {host!r} is empty or has a space; name the machine's real host or IP")
        # Clients pin a connection to the party they meant by its name under IDENTITY_DOMAIN: a host there
        # (or a wildcard) in another party's certificate would let that party answer in its place.
        name = host.lower().rstrip(".")
        if "*" in host or name == IDENTITY_DOMAIN or name.endswith("." + IDENTITY_DOMAIN):
            raise ValueError(f"host {host!r} is a wildcard or a party name under {IDENTITY_DOMAIN}, which "
                             "only the party's own identity may carry; name the machine's real host or IP")
