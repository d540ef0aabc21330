"""Revocation checked on every call: grpcio Python has no CRL option, so the server checks serials itself.

The CRL file is re-read when its modification time or size changes (a
revocation published by `mor pki revoke` reaches channels that are already
open, on their next call). A CRL is used only if the consortium CA signed it;
one that fails to parse or verify keeps the last good list and is logged,
since silently accepting every certificate would be worse than a stale list.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cryptography import x509

logger = logging.getLogger(__name__)


class RevocationList:
    """The serials revoked by the consortium CA, from a CRL file that may change while the server runs."""

    def __init__(self, crl_path: str | Path, ca_certificate: x509.Certificate) -> None:
        self.path = Path(crl_path)
        self._ca = ca_certificate
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._revoked: frozenset[int] = frozenset()
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: CRL not found; every server needs the consortium CRL "
                                    "(`mor pki init` writes it, `mor pki revoke` updates it)")
        self._reload()
        if self._stamp is None:
            raise ValueError(f"{self.path}: not a CRL signed by the consortium CA")

    def _reload(self) -> None:
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            crl = x509.load_pem_x509_crl(self.path.read_bytes())
            if crl.issuer != self._ca.subject or not crl.is_signature_valid(self._ca.public_key()):
                raise ValueError("not signed by the consortium CA")
        except ValueError as exc:
            logger.error("%s: CRL rejected (%s); keeping the previous revocation list", self.path, exc)
            return
        self._revoked = frozenset(entry.serial_number for entry in crl)
        self._stamp = stamp

    def is_revoked(self, serial: int) -> bool:
        """Whether `serial` is on the current CRL (re-read first if the file changed)."""
        with self._lock:
            try:
                self._reload()
            except OSError as exc:
                logger.error("%s: cannot read the CRL (%s); keeping the previous revocation list", self.path, exc)
            return serial in self._revoked
