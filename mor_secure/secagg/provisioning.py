"""Secure-aggregation material in the parties' kits, made at provisioning (`mor pki init` / `mor pki issue`).

    silo kit:         he_secret.ctx   the consortium's BFV context WITH its secret key (0600)
                      agreement.key   the silo's X25519 private key (0600)
                      agreement.json  its public half, signed by the silo's certificate key
    coordinator kit:  he_public.ctx   the same context WITHOUT the secret key: it can encrypt and add,
                                      never decrypt (he_context.load_public refuses a secret one)
    CA directory:     he_secret.ctx   kept so that a silo issued later joins the same context

One context per consortium: every silo can decrypt a round's blinded sum
(the round's decryptor is one of them), the coordinator cannot. Whoever runs
`mor pki init` holds the CA key and this context; that party must not be the
coordinator's operator acting alone (docs/threat-model.md). A renewed silo
kit keeps its X25519 key, re-signed by the new certificate key, unless it is
renewed with a new one (`--new-agreement-key`, after a compromise: whoever
copied the kit could otherwise unmask the silo's terms with the
coordinator's help under the renewed, unrevoked certificate).
"""

from __future__ import annotations

import os
from pathlib import Path

import tenseal as ts
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from mor_secure.pki.files import write_private, write_public
from mor_secure.pki.identity import Role
from mor_secure.pki.kits import CertKit

from .agreement import AgreementKeyError, SignedAgreementKey, sign_agreement_key, verified_agreement_key
from .he_context import load_public, load_secret, new_secret_context, public_bytes, secret_bytes

HE_SECRET_FILE = "he_secret.ctx"
HE_PUBLIC_FILE = "he_public.ctx"
AGREEMENT_KEY_FILE = "agreement.key"
AGREEMENT_PUBLIC_FILE = "agreement.json"


def new_consortium_context(ca_directory: Path) -> bytes:
    """Make the consortium's context, keep its secret form in the CA directory, return it."""
    secret = secret_bytes(new_secret_context())
    write_private(Path(ca_directory) / HE_SECRET_FILE, secret)
    return secret


def provision_kit(kit: CertKit, role: Role, ca_directory: Path, *, new_agreement_key: bool = False) -> None:
    """Give a freshly issued (or renewed) kit its secure-aggregation material, if the CA has a context.

    `new_agreement_key` replaces a silo kit's X25519 key instead of re-signing it.
    """
    secret_path = Path(ca_directory) / HE_SECRET_FILE
    if new_agreement_key and role != Role.SILO:
        raise ValueError(f"only a silo kit has a key-agreement key; a {role.value} kit has none to replace")
    if not secret_path.is_file() or role == Role.AUDITOR:
        return
    secret = secret_path.read_bytes()
    if role == Role.COORDINATOR:
        write_public(kit.directory / HE_PUBLIC_FILE, public_bytes(load_secret(secret)))
        return
    if not (kit.directory / HE_SECRET_FILE).is_file():
        write_private(kit.directory / HE_SECRET_FILE, secret)
    key_path = kit.directory / AGREEMENT_KEY_FILE
    if key_path.is_file() and not new_agreement_key:
        private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    else:
        private = x25519.X25519PrivateKey.generate()
        # Written aside, then renamed over the old key: a kill leaves the old key or the new one, never none or
        # half of one. The old one is not kept: a running server holds it in memory, and nothing else needs it.
        pending = key_path.with_name(f".{AGREEMENT_KEY_FILE}.pending")
        pending.unlink(missing_ok=True)  # left by a replacement killed before its rename: never in use
        write_private(pending, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
        os.replace(pending, key_path)
    signed = sign_agreement_key(private.public_key(), _certificate_key(kit), kit.certificate())
    write_public(kit.directory / AGREEMENT_PUBLIC_FILE, signed.to_json().encode("utf-8"))


def _certificate_key(kit: CertKit) -> ec.EllipticCurvePrivateKey:
    return serialization.load_pem_private_key(kit.key_path.read_bytes(), password=None)


def has_silo_material(kit: CertKit) -> bool:
    """Whether a silo's kit was provisioned for secure aggregation."""
    return all((kit.directory / name).is_file() for name in (HE_SECRET_FILE, AGREEMENT_KEY_FILE, AGREEMENT_PUBLIC_FILE))


def has_coordinator_material(kit: CertKit) -> bool:
    """Whether the coordinator's kit holds the public context."""
    return (kit.directory / HE_PUBLIC_FILE).is_file()


def coordinator_context(kit: CertKit) -> ts.Context:
    """The coordinator's public context (ValueError if its kit holds a secret one)."""
    return load_public((kit.directory / HE_PUBLIC_FILE).read_bytes())


def silo_context(kit: CertKit) -> ts.Context:
    """A silo's secret context."""
    return load_secret((kit.directory / HE_SECRET_FILE).read_bytes())


def silo_agreement(kit: CertKit) -> tuple[x25519.X25519PrivateKey, SignedAgreementKey]:
    """A silo's X25519 private key and its signed public half (checked against the kit's own certificate)."""
    private = serialization.load_pem_private_key((kit.directory / AGREEMENT_KEY_FILE).read_bytes(), password=None)
    signed = SignedAgreementKey.from_json((kit.directory / AGREEMENT_PUBLIC_FILE).read_text(encoding="utf-8"))
    verified = verified_agreement_key(signed, kit.certificate())
    if verified.public_bytes_raw() != private.public_key().public_bytes_raw():
        raise AgreementKeyError(f"{kit.directory / AGREEMENT_PUBLIC_FILE} is not the public half of "
                                f"{AGREEMENT_KEY_FILE} (a renewal cut short?): run the same `mor pki issue --renew` "
                                "again")
    return private, signed
