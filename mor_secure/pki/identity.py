"""Who a certificate speaks for: a role and a name, carried in the certificate's SAN URI.

`mor://silo/hospital-a`, `mor://coordinator/coordinator`, `mor://auditor/auditor`:
the transport reads the caller's identity only from this URI in the peer
certificate the TLS handshake verified (gRPC's auth context), never from a
request field. Names are DNS-label-like so they are safe in URIs, file names
and log lines alike.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

SCHEME = "mor"
# A DNS name per party, never resolved: clients make TLS verify it (ssl_target_name_override), which binds a
# connection to the party they meant to reach, not just to any holder of a consortium certificate.
IDENTITY_DOMAIN = "mor-secure.invalid"  # .invalid is reserved (RFC 2606): it can never name a real host
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # used with fullmatch: `$` would admit a final "\n"
# A host name a certificate may carry: dot-separated letter-digit-hyphen labels (RFC 1123 §2.1), at most 253.
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class Role(str, Enum):
    """What a party does in the consortium; each RPC allows some roles (transport/authorization.py)."""

    SILO = "silo"
    COORDINATOR = "coordinator"
    AUDITOR = "auditor"


@dataclass(frozen=True)
class PartyIdentity:
    """A party of the consortium: its role and its name."""

    role: Role
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"party name {self.name!r} must be 1-63 lower-case letters, digits or '-', "
                             "starting and ending with a letter or digit")

    @property
    def uri(self) -> str:
        """The SAN URI naming this party, e.g. mor://silo/hospital-a."""
        return f"{SCHEME}://{self.role.value}/{self.name}"

    @property
    def tls_name(self) -> str:
        """The DNS SAN that names this party in its certificate, e.g. hospital-a.silo.mor-secure.invalid."""
        return f"{self.name}.{self.role.value}.{IDENTITY_DOMAIN}"

    def __str__(self) -> str:
        return self.uri


def parse_identity(uri: str) -> PartyIdentity:
    """The identity in a SAN URI; ValueError naming what is wrong for anything else."""
    prefix = f"{SCHEME}://"
    if not isinstance(uri, str) or not uri.startswith(prefix):
        raise ValueError(f"{uri!r} is not a consortium identity (expected {prefix}<role>/<name>)")
    parts = uri[len(prefix):].split("/")
    if len(parts) != 2:
        raise ValueError(f"{uri!r} is not a consortium identity (expected {prefix}<role>/<name>)")
    try:
        role = Role(parts[0])
    except ValueError:
        raise ValueError(f"{uri!r}: unknown role {parts[0]!r}; known: {[r.value for r in Role]}") from None
    return PartyIdentity(role, parts[1])


def check_hosts(hosts: Sequence[str]) -> None:
    """ValueError for a host a party's certificate may not name besides the party itself."""
    for host in hosts:
        if not host or any(character.isspace() for character in host):
            raise ValueError(f"host {host!r} is empty or has a space; name the machine's real host or IP")
        # Clients pin a connection to the party they meant by its name under IDENTITY_DOMAIN: a host there
        # (or a wildcard) in another party's certificate would let that party answer in its place.
        name = host.lower().rstrip(".")
        if "*" in host or name == IDENTITY_DOMAIN or name.endswith("." + IDENTITY_DOMAIN):
            raise ValueError(f"host {host!r} is a wildcard or a party name under {IDENTITY_DOMAIN}, which "
                             "only the party's own identity may carry; name the machine's real host or IP")
        if not (_is_ip_address(host) or (len(host) <= 253 and all(_HOST_LABEL.fullmatch(label)
                                                                  for label in host.split(".")))):
            raise ValueError(f"host {host!r} is neither an IP address nor a host name (letters, digits and '-' "
                             "in dot-separated labels, as silo.example.org; an international name in its xn-- "
                             "form; no port, path or prefix length)")


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return "%" not in host  # a zone (fe80::1%eth0) is local to one machine, and no certificate can carry it
