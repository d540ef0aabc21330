"""Revocation checked on every call: grpcio Python has no CRL option, so the server checks serials itself.

The CRL file is re-read when its modification time or size changes (a
revocation published by `mor pki revoke` reaches channels that are already
open, on their next call). A CRL is used only if the consortium CA signed it
and its number (RFC 5280 §5.2.3) is not below the one in use: an older CRL
put back in place would un-revoke whatever was revoked since. One that fails
any of these checks keeps the last good list and is logged, since silently
accepting every certificate would be worse than a stale list: once per
version of the file (and once while it cannot be read), not on every call,
so that a bad file does not turn each caller's call into a logged error.

A server does not start on a CRL past its next update (`mor pki crl`
re-signs it); one that goes stale while the server runs is logged as an
error, once, and still used: refusing every caller would stop the silo over a
missed re-signing, while a newer revocation would arrive in a newer file.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from pathlib import Path

from cryptography import x509

from mor_secure.pki.kits import crl_number

logger = logging.getLogger(__name__)

# Said of a CRL that parses but is not the kit CA's: another CA's looks like a forged one (consortium CAs share
# their name, and a CRL does not name its key), and a kit or CRL from the wrong consortium is the likelier.
NOT_THE_KITS_CA = ("the kit's ca.pem is not the CA that signed this CRL: a kit from another consortium, or the "
                   "wrong CRL")


class _SignedByAnotherCA(ValueError):
    """The CRL parses, but the CA it was checked against did not sign it."""


_RESIGN_HINT = "re-sign it with `mor pki crl --ca pki/ca` and publish it here"


class RevocationList:
    """The serials revoked by the consortium CA, from a CRL file that may change while the server runs."""

    def __init__(self, crl_path: str | Path, ca_certificate: x509.Certificate) -> None:
        self.path = Path(crl_path)
        self._ca = ca_certificate
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._rejected_stamp: tuple[int, int] | None = None  # the file version last refused: not parsed again
        self._signed_by_another_ca = False  # whether that version parsed and failed only the CA: said at start
        self._unreadable_logged = False
        self._number = -1
        self._next_update: dt.datetime | None = None
        self._stale_logged = False
        self._revoked: frozenset[int] = frozenset()
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: CRL not found; every server needs the consortium CRL "
                                    "(`mor pki init` writes it, `mor pki revoke` updates it)")
        self._reload()
        if self._stamp is None:
            raise ValueError(f"{self.path}: " + (NOT_THE_KITS_CA if self._signed_by_another_ca
                                                 else "not a CRL signed by the consortium CA"))
        if self._is_stale():
            raise ValueError(f"{self.path}: the CRL went stale at {self._next_update:%Y-%m-%d %H:%M} UTC, so "
                             f"revocations since then may be missing; {_RESIGN_HINT}")

    def _reload(self) -> None:
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp in (self._stamp, self._rejected_stamp):
            return
        try:
            crl = x509.load_pem_x509_crl(self.path.read_bytes())
            if crl.issuer != self._ca.subject or not crl.is_signature_valid(self._ca.public_key()):
                raise _SignedByAnotherCA(NOT_THE_KITS_CA)
            number = crl_number(crl)
            if number < self._number:
                raise ValueError(f"CRL number {number} is older than the {self._number} in use; an older CRL "
                                 "would un-revoke the certificates revoked since")
        except ValueError as exc:
            self._rejected_stamp, self._signed_by_another_ca = stamp, isinstance(exc, _SignedByAnotherCA)
            logger.error("%s: CRL rejected (%s); keeping the previous revocation list", self.path, exc)
            return
        self._rejected_stamp = None
        self._revoked = frozenset(entry.serial_number for entry in crl)
        self._number, self._next_update, self._stamp = number, crl.next_update_utc, stamp
        self._stale_logged = False

    def _is_stale(self) -> bool:
        return self._next_update is not None and self._next_update < dt.datetime.now(dt.timezone.utc)

    def is_revoked(self, serial: int) -> bool:
        """Whether `serial` is on the current CRL (re-read first if the file changed)."""
        with self._lock:
            try:
                self._reload()
                self._unreadable_logged = False
            except OSError as exc:
                if not self._unreadable_logged:
                    self._unreadable_logged = True
                    logger.error("%s: cannot read the CRL (%s); keeping the previous revocation list", self.path,
                                 exc)
            if not self._stale_logged and self._is_stale():
                self._stale_logged = True
                logger.error("%s: the CRL in use went stale at %s; %s", self.path, self._next_update, _RESIGN_HINT)
            return serial in self._revoked
