"""The client side: an mTLS channel from a party's kit, and turning gRPC errors back into `SiloError`s.

There is no insecure channel in product code. With `audit=` every call on
the channel is recorded in the caller's log (client_audit.py). Keepalive pings every 60 s on
idle connections (the server allows one per 30 s) notice a silo that
vanished without a FIN before the next round's deadline does.
"""

from __future__ import annotations

import grpc

from mor_secure.pki.identity import PartyIdentity
from mor_secure.pki.kits import CertKit
from mor_secure.wire.errors import ErrorCode, SiloError

from .authorization import AuditSink
from .client_audit import AuditingClientInterceptor
from .credentials import channel_credentials

KEEPALIVE_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
MAX_MESSAGE_BYTES = 32 << 20


def secure_channel(address: str, kit: CertKit, *, expect: PartyIdentity,
                   audit: AuditSink | None = None) -> grpc.Channel:
    """A channel to `address` (host:port) that presents `kit`'s certificate and trusts only the consortium CA.

    The server must prove it is `expect`: TLS verifies the server certificate
    against `expect.tls_name` (its per-party DNS SAN) instead of the address's
    host, so another consortium member answering at that address is refused
    at the handshake (UNAVAILABLE).
    """
    options = [("grpc.ssl_target_name_override", expect.tls_name),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
               # A fresh subchannel per client object: a renewed kit or a restarted silo gets a new handshake.
               ("grpc.use_local_subchannel_pool", 1),
               # gRPC's default reconnect backoff grows to 120 s; a silo restarted after a crash should rejoin
               # within a few GRPO steps, not minutes.
               ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
               ("grpc.max_reconnect_backoff_ms", 5_000)]
    channel = grpc.secure_channel(address, channel_credentials(kit), options=options)
    return channel if audit is None else grpc.intercept_channel(channel, AuditingClientInterceptor(audit, expect))


def as_silo_error(error: grpc.RpcError, silo: str) -> SiloError:
    """The `SiloError` of a failed call, with the status the server (or gRPC) chose."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    try:
        mapped = ErrorCode(code.name)
    except ValueError:
        mapped = ErrorCode.INTERNAL
    return SiloError(mapped, f"silo {silo!r}: {details or code.name}")
