"""A party's certificate kit: the directory the transport and the audit log read a party's credentials from.

    <kit>/ca.pem      the consortium CA certificate (trust anchor)
    <kit>/party.pem   this party's certificate (role and name in its SAN URI)
    <kit>/party.key   its private key (mode 0600; *.key is git-ignored; the directory is 0700)
    <kit>/crl.pem     the CA's certificate revocation list, as of issue (servers reload their CRL file on change)

A renewed kit replaces party.pem and party.key; servers pick the new pair up
on the next connection without a restart (transport/credentials.py).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .identity import PartyIdentity, parse_identity

CA_FILE = "ca.pem"
CERT_FILE = "party.pem"
KEY_FILE = "party.key"
CRL_FILE = "crl.pem"


def identity_of(certificate: x509.Certificate) -> PartyIdentity:
    """The one consortium identity in a certificate's SAN URIs; ValueError if none or several."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate has no subjectAltName, so it names no consortium party") from None
    identities = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            identities.append(parse_identity(uri))
        except ValueError:
            continue
    if len(identities) != 1:
        raise ValueError(f"certificate names {len(identities)} consortium identities in its SAN URIs; exactly one "
                         "is allowed")
    return identities[0]


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL's number (RFC 5280 §5.2.3), or 0 for a CRL written before `mor pki` numbered its CRLs."""
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def not_a_kits_own(kit_dir: Path) -> list[str]:
    """What `kit_dir` holds besides what an issue killed there could have left (a fresh kit's public files, its
    pending key, their partial writes)."""
    if not kit_dir.is_dir():
        return []
    own = (CA_FILE, CRL_FILE, CERT_FILE, f"{KEY_FILE}.new")
    return sorted(p.name for p in kit_dir.iterdir() if p.name not in own and not any(
        p.name.startswith(f".{name}.") and p.name.endswith(".partial") for name in own))


def undo_killed_renewal(key_path: Path, retired: Path, certificate: x509.Certificate) -> None:
    """Put a kit a renewal was killed in back on its old key, so the renewal can run again.

    Killed after the old key got its retired name: party.key is still the old key (drop the spare name), or
    already the new one while party.pem is still the old certificate (a mismatched pair: the old key goes back).
    """
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if key.public_key() == certificate.public_key():
        retired.unlink()
    else:
        os.replace(retired, key_path)


@dataclass(frozen=True)
class CertKit:
    """The files of one party's kit; `load` checks they are all there."""

    directory: Path

    @classmethod
    def load(cls, directory: str | Path) -> CertKit:
        kit = cls(Path(directory))
        missing = [p.name for p in (kit.ca_path, kit.cert_path, kit.key_path, kit.crl_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{kit.directory}: not a complete certificate kit (missing {', '.join(missing)}); "
                                    "issue one with `mor pki issue` or `mor pki init`")
        kit.refuse_secrets_others_can_read()
        return kit

    def refuse_secrets_others_can_read(self) -> None:
        """PermissionError for a secret of the kit (party.key, every other *.key, the secure-aggregation secret)
        open to its group or others: whoever could read it can answer as this party and sign its audit
        checkpoints, so a party refuses to start with it rather than warn."""
        secrets = dict.fromkeys([self.key_path, *sorted(self.directory.glob("*.key")),
                                 *sorted(self.directory.glob("*secret*"))])
        for path in secrets:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise PermissionError(f"{path}: this private key is mode {mode:04o}, open to users other than its "
                                      f"owner (it must be 0600): run `chmod 600 {path}`. A key others could read is "
                                      "compromised: if anyone may have read it, have the consortium revoke it and "
                                      "renew the kit")

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_FILE

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL_FILE

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    def ca_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca_path.read_bytes())

    def identity(self) -> PartyIdentity:
        """Who this kit speaks for, read from its certificate."""
        return identity_of(self.certificate())
