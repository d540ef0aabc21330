"""Building a party's gRPC server: mTLS only, every handler authorized, health and reflection served.

There is no insecure port anywhere in product code: `serve` binds only with
`server_credentials(kit)`, which requires client certificates. The port may
be 0 (the OS picks one, which `RunningServer.port` reports), so tests and the
demo never fight over fixed ports.

Health (grpc.health.v1) starts NOT_SERVING and is switched to SERVING by the
party once it can answer (the silo: once its model is loaded), and back to
NOT_SERVING while it drains on shutdown. Reflection lets standard tools
(grpcurl) list the services, over the same mTLS port.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mor_secure.pki.identity import Role
from mor_secure.pki.kits import CertKit

from .authorization import DEFAULT_MAX_OPEN_STREAMS, Admission, AuditSink, AuthorizingInterceptor
from .credentials import server_credentials
from .revocation import RevocationList

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    """Transport limits of one server (the party's policy sets the per-request content limits)."""

    host: str = "127.0.0.1"
    port: int = 0
    # Above every policy's request limits (mor_secure.policy): gRPC refuses larger messages with
    # RESOURCE_EXHAUSTED before any of our code runs; smaller ones reach the policy's checks.
    max_message_bytes: int = 32 << 20
    max_workers: int = 8
    # Health Watch and reflection streams open at once; each holds one of the workers while open.
    max_open_streams: int = DEFAULT_MAX_OPEN_STREAMS
    # Clients ping every 60 s when idle (channel.py); allow that, refuse floods of pings.
    min_ping_interval_ms: int = 30_000


@dataclass
class RunningServer:
    """A started server: its port, its health servicer, its CRL, and a graceful stop."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]
    # The CRL its callers are checked against; services that judge other parties' certificates share it.
    revocations: RevocationList

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting calls, let in-flight ones finish for up to `grace_seconds`, then close."""
        self.set_serving(False)
        self.server.stop(grace_seconds).wait()


def _why_unbindable(host: str, port: int) -> str:
    """Why gRPC could not listen on host:port, in words an operator can act on (gRPC says only "Failed to bind")."""
    if ":" in host and not host.startswith("["):
        return f"an IPv6 address is written in brackets, as [{host}]; fix serve.host"
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return f"{host!r} is neither an address of this machine nor a name it can resolve; fix serve.host"
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} is in use (another server, or a silo already serving); choose another " \
                           "serve.port or --port"
                return f"{exc.strerror}; fix serve.host or serve.port"
    return "gRPC could not bind it; fix serve.host or serve.port"


def serve(*, kit: CertKit, crl_path, services: Sequence[tuple[Callable[[object, grpc.Server], None], object, str]],
          roles_by_rpc: Mapping[str, frozenset[Role]], admission: Admission | None = None,
          audit: AuditSink | None = None, settings: ServerSettings | None = None) -> RunningServer:
    """Start a server for `services` ((add_to_server, servicer, full service name), ...) on an mTLS port."""
    settings = settings or ServerSettings()
    revocations = RevocationList(crl_path, kit.ca_certificate())
    if settings.max_open_streams >= settings.max_workers:
        raise ValueError(f"max_open_streams ({settings.max_open_streams}) must be below max_workers "
                         f"({settings.max_workers}), or open streams could take every worker from the calls")
    # Admitted calls beyond the free workers would wait in the executor's queue, not be refused, and a health
    # check would wait behind them: at least one worker stays free for health checks and refusals.
    if admission is not None and admission.max_concurrent_calls + settings.max_open_streams >= settings.max_workers:
        raise ValueError(f"the policy's max_concurrent_requests ({admission.max_concurrent_calls}) plus "
                         f"max_open_streams ({settings.max_open_streams}) must be below max_workers "
                         f"({settings.max_workers}); lower max_concurrent_requests to at most "
                         f"{settings.max_workers - settings.max_open_streams - 1} or run more workers")
    interceptor = AuthorizingInterceptor(roles_by_rpc, revocations, admission=admission, audit=audit,
                                         max_open_streams=settings.max_open_streams)
    options = [("grpc.max_receive_message_length", settings.max_message_bytes),
               ("grpc.max_send_message_length", settings.max_message_bytes),
               ("grpc.http2.min_recv_ping_interval_without_data_ms", settings.min_ping_interval_ms),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
                         interceptors=[interceptor], options=options)
    names = []
    for add_to_server, servicer, name in services:
        add_to_server(servicer, server)
        names.append(name)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = server_credentials(kit)
    try:
        port = server.add_secure_port(f"{settings.host}:{settings.port}", credentials)
    except RuntimeError:  # gRPC's "Failed to bind to address ...; set GRPC_VERBOSITY=debug ..."
        port = 0
    if port == 0:
        raise ValueError(f"cannot listen on {settings.host}:{settings.port}: "
                         f"{_why_unbindable(settings.host, settings.port)}")
    running = RunningServer(server=server, port=port, health=health_servicer, service_names=tuple(names),
                            revocations=revocations)
    running.set_serving(False)
    server.start()
    logger.info("serving %s on %s:%d (mTLS, client certificates required)", ", ".join(names), settings.host, port)
    return running
