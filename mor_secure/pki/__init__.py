"""The consortium PKI: a CA, party certificate kits (role and name in a SAN URI), revocation via a signed CRL."""

from .authority import CertificateAuthority, IssuedCertificate
from .identity import PartyIdentity, Role, parse_identity
from .kits import CertKit, identity_of

__all__ = ["CertKit", "CertificateAuthority", "IssuedCertificate", "PartyIdentity", "Role", "identity_of",
           "parse_identity"]
