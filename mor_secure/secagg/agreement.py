"""Each silo's key-agreement key (X25519), its public half signed by the silo's certificate key.

Pairwise masks come from X25519 agreements between silos. The coordinator
relays the public halves, so it could swap one for its own and learn that
pair's masks; each public half is therefore signed with the silo's
certificate key (ECDSA P-256, the key its consortium certificate certifies)
over a canonical body naming the silo, and every silo verifies a peer's key
against the peer's certificate before using it (Flower's SecAgg+ relays keys
unsigned: DESIGN §5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from mor_secure.audit.checkpoints import canonical_json
from mor_secure.pki.kits import identity_of

FORMAT = "mor-secure/agreement-key/v1"
# The longest signed key's JSON: a 74-character party URI (63-character name), 64 hex digits of key and at most
# 144 of DER ECDSA signature come to ~320 characters. Longer text is refused before parsing, which also keeps
# nesting below the depth at which `json` raises RecursionError (~1000).
MAX_SIGNED_KEY_CHARS = 512


class AgreementKeyError(ValueError):
    """A peer's key-agreement key that is not signed by that peer's certificate key."""


@dataclass(frozen=True)
class SignedAgreementKey:
    """A silo's X25519 public key (32 raw bytes) and its certificate key's signature over `body()`."""

    party: str
    public_key: bytes
    signature: bytes

    def body(self) -> bytes:
        return canonical_json({"format": FORMAT, "party": self.party, "x25519": self.public_key.hex()})

    def to_json(self) -> str:
        return json.dumps({"party": self.party, "x25519": self.public_key.hex(), "signature": self.signature.hex()})

    @classmethod
    def from_json(cls, text: str) -> SignedAgreementKey:
        if len(text) > MAX_SIGNED_KEY_CHARS:
            raise AgreementKeyError(f"its signed key is {len(text)} characters long, more than a signed key can "
                                    f"be ({MAX_SIGNED_KEY_CHARS})")
        fields = json.loads(text)
        return cls(party=fields["party"], public_key=bytes.fromhex(fields["x25519"]),
                   signature=bytes.fromhex(fields["signature"]))


def sign_agreement_key(public_key: x25519.X25519PublicKey, certificate_key: ec.EllipticCurvePrivateKey,
                       certificate: x509.Certificate) -> SignedAgreementKey:
    """The X25519 public key, signed for the certificate's party with its certificate key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    unsigned = SignedAgreementKey(party=identity_of(certificate).uri, public_key=raw, signature=b"")
    signature = certificate_key.sign(unsigned.body(), ec.ECDSA(hashes.SHA256()))
    return SignedAgreementKey(party=unsigned.party, public_key=raw, signature=signature)


def new_agreement_key(certificate_key: ec.EllipticCurvePrivateKey,
                      certificate: x509.Certificate) -> tuple[x25519.X25519PrivateKey, SignedAgreementKey]:
    """A fresh X25519 pair for the certificate's party, the public half signed with its certificate key."""
    private = x25519.X25519PrivateKey.generate()
    return private, sign_agreement_key(private.public_key(), certificate_key, certificate)


def verified_agreement_key(key: SignedAgreementKey, certificate: x509.Certificate) -> x25519.X25519PublicKey:
    """The peer's X25519 public key, if `certificate` is the peer's and its key signed this one."""
    party = identity_of(certificate).uri
    if party != key.party:
        raise AgreementKeyError(f"the key-agreement key claims to be {key.party}'s, but the certificate is {party}'s")
    try:
        certificate.public_key().verify(key.signature, key.body(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AgreementKeyError(f"{key.party}'s key-agreement key is not signed by its certificate key (swapped or "
                                "altered on the way)") from None
    return x25519.X25519PublicKey.from_public_bytes(key.public_key)
