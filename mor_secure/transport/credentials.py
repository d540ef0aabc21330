"""mTLS credentials from a certificate kit: servers require client certificates; nothing here is insecure.

Server credentials are dynamic (`grpc.dynamic_ssl_server_credentials`): gRPC
asks for the current certificate before each new connection, and a kit
renewed on disk (`mor pki issue --renew`) is picked up then, without a
restart. Client certificates are always required and verified against the
consortium CA. grpcio Python cannot pin TLS versions (its defaults are TLS 1.2
minimum, 1.3 maximum; DESIGN §5): docs/threat-model.md says so.
"""

from __future__ import annotations

import logging
import threading

import grpc

from mor_secure.pki.kits import CertKit

logger = logging.getLogger(__name__)


def channel_credentials(kit: CertKit) -> grpc.ChannelCredentials:
    """Client side: trust only the consortium CA, and present this party's certificate."""
    return grpc.ssl_channel_credentials(root_certificates=kit.ca_path.read_bytes(),
                                        private_key=kit.key_path.read_bytes(),
                                        certificate_chain=kit.cert_path.read_bytes())


class _KitWatcher:
    """Hands gRPC the kit's certificate again whenever its files changed since the last connection."""

    def __init__(self, kit: CertKit) -> None:
        self.kit = kit
        self._lock = threading.Lock()
        self._stamp = self._current_stamp()

    def _current_stamp(self) -> tuple:
        return tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (self.kit.cert_path, self.kit.key_path,
                                                                         self.kit.ca_path))

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.kit.key_path.read_bytes(), self.kit.cert_path.read_bytes())],
            root_certificates=self.kit.ca_path.read_bytes())

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each handshake; None keeps the current configuration.
        with self._lock:
            try:
                stamp = self._current_stamp()
                if stamp == self._stamp:
                    return None
                configuration = self.configuration()
            except OSError as exc:
                logger.error("%s: cannot read the renewed kit (%s); keeping the current certificate",
                             self.kit.directory, exc)
                return None
            self._stamp = stamp
            logger.info("%s: renewed certificate kit loaded for new connections", self.kit.directory)
            return configuration


def server_credentials(kit: CertKit) -> grpc.ServerCredentials:
    """Server side: this party's certificate (reloaded when renewed); client certificates required."""
    watcher = _KitWatcher(kit)
    return grpc.dynamic_ssl_server_credentials(watcher.configuration(), watcher.fetch,
                                               require_client_authentication=True)
