"""Every call is authorized by one wrapper that no handler can skip: identity, revocation, role, policy, audit.

gRPC Python server interceptors see only the method name and metadata, not
the TLS auth context (DESIGN §5), so `AuthorizingInterceptor` wraps the
handler that `continuation()` returns (all four handler kinds): the wrapped
behaviour runs inside the call, where `context.auth_context()` holds the peer
certificate the handshake verified. From it, and from nothing the caller
sends, the wrapper reads the caller's identity (the SAN URI) and serial, then

1. refuses a revoked certificate, and one outside its validity dates
   (UNAUTHENTICATED), checked on every call and before every response of a
   stream: the handshake checks the dates only when a connection opens, and
   a client's keepalive pings hold one open for good, so without this a
   certificate that expires (or is revoked) mid-connection would go on
   being served (a party's open health Watch ends at its next update);
2. refuses a role the RPC does not allow (PERMISSION_DENIED), from a table
   that must name every RPC (a missing one is refused, and a test fails);
3. asks the party's policy (`Admission`), e.g. the silo's allowed callers,
   rate limits and caps (PERMISSION_DENIED / RESOURCE_EXHAUSTED);
4. records one entry per call through an `AuditSink` (the party's
   tamper-evident log): caller, RPC, round, request digest and item count
   (`serde.call_facts`, never the request itself), decision, reason,
   status and latency. The entry is durable before the answer leaves, and
   the answer's trailing metadata `mor-checkpoint-bin` carries the log's
   latest signed checkpoint, so the caller holds the party's tree head as
   it was once this call was on record. If the log cannot record, the
   call fails with INTERNAL: nothing is answered off the record.

Health checking and reflection are for standard tools: every role may call
them, but they pass through the same identity, revocation and audit steps,
and at most `max_open_streams` of their streams are open at once (each holds
a worker thread while open: RESOURCE_EXHAUSTED beyond that). Their requests
are parsed only after the decision (a malformed one is INVALID_ARGUMENT, on
record, not an INTERNAL from gRPC before the wrapper runs), and a method the
server does not have goes through the same steps and ends UNIMPLEMENTED, so
nobody probes for methods off the record.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from cryptography import x509

from mor_secure.audit.checkpoints import SignedCheckpoint
from mor_secure.pki.identity import PartyIdentity, Role
from mor_secure.pki.kits import identity_of
from mor_secure.wire import serde
from mor_secure.wire.errors import ErrorCode, SiloError, invalid

from .revocation import RevocationList

logger = logging.getLogger(__name__)

# Services every authenticated party may use: gRPC health checking and server reflection.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
# Streams (health Watch, reflection) open at once on one server: each holds a worker thread while open
# (ServerSettings.max_workers: 8 by default, leaving six for calls; `mor silo serve` adds a worker per call
# its policy admits); standard tools open one, briefly.
DEFAULT_MAX_OPEN_STREAMS = 2
# Trailing metadata key of the checkpoint every answer carries ("-bin": binary, a serialised SignedCheckpoint).
CHECKPOINT_METADATA = "mor-checkpoint-bin"


@dataclass(frozen=True)
class Caller:
    """The verified caller of one RPC, and its certificate's validity dates (UTC)."""

    identity: PartyIdentity
    serial: int
    valid_from: dt.datetime
    valid_until: dt.datetime


class Admission(Protocol):
    """A party's policy decision for one call; raise `SiloError` to refuse, return a release callback."""

    @property
    def max_concurrent_calls(self) -> int:
        """The most calls it admits at once (the server checks it has workers for them; see `serve`)."""
        ...

    def admit(self, caller: Caller, method: str) -> Callable[[], None]:
        ...


class AuditSink(Protocol):
    """Where every call is recorded (mor_secure.audit.AuditLog)."""

    def record(self, event: Mapping[str, Any]) -> int:
        """Append one entry durably; returns its index."""
        ...

    def latest_checkpoint(self) -> SignedCheckpoint | None:
        """The newest signed tree head."""
        ...

    @property
    def size(self) -> int:
        """How many entries are recorded."""
        ...


def peer_caller(context: grpc.ServicerContext) -> Caller:
    """The caller's identity and serial from the TLS auth context; UNAUTHENTICATED if there is none."""
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    if not pem:
        raise SiloError(ErrorCode.UNAUTHENTICATED, "no verified client certificate on this connection")
    certificate = x509.load_pem_x509_certificate(pem[0])
    try:
        identity = identity_of(certificate)
    except ValueError as exc:
        raise SiloError(ErrorCode.UNAUTHENTICATED, f"client certificate names no consortium party: {exc}") from None
    return Caller(identity=identity, serial=certificate.serial_number, valid_from=certificate.not_valid_before_utc,
                  valid_until=certificate.not_valid_after_utc)


def abort_with(context: grpc.ServicerContext, error: SiloError) -> None:
    """End the call with the gRPC status named like `error.code` (raises, as context.abort does).

    The message is bounded as the audit entry's reason is: a refusal may quote what the caller sent, and
    details over gRPC's 16 KiB metadata limit would reach the caller as RESOURCE_EXHAUSTED instead.
    """
    context.abort(getattr(grpc.StatusCode, error.code.value), serde.bounded_text(error.message))


class AuthorizingInterceptor(grpc.ServerInterceptor):
    """Wraps every handler of the server it is installed on (see the module docstring)."""

    def __init__(self, roles_by_rpc: Mapping[str, frozenset[Role]], revocations: RevocationList, *,
                 admission: Admission | None = None, audit: AuditSink | None = None,
                 max_open_streams: int = DEFAULT_MAX_OPEN_STREAMS) -> None:
        if max_open_streams < 1:
            raise ValueError(f"max_open_streams must be >= 1, got {max_open_streams!r}")
        self.roles_by_rpc = {method: frozenset(roles) for method, roles in roles_by_rpc.items()}
        self.revocations = revocations
        self.admission = admission
        self.audit = audit
        self.max_open_streams = max_open_streams
        self._open_streams = threading.BoundedSemaphore(max_open_streams)

    # --- the decision -------------------------------------------------------------------
    def _check_standing(self, caller: Caller) -> None:
        """UNAUTHENTICATED unless the caller's certificate is unrevoked and within its validity dates now."""
        if self.revocations.is_revoked(caller.serial):
            raise SiloError(ErrorCode.UNAUTHENTICATED, f"certificate {caller.serial:x} of {caller.identity} is "
                            "revoked")
        now = dt.datetime.now(dt.timezone.utc)
        if not caller.valid_from <= now <= caller.valid_until:
            raise SiloError(ErrorCode.UNAUTHENTICATED, f"certificate {caller.serial:x} of {caller.identity} is "
                            f"valid from {caller.valid_from:%Y-%m-%d %H:%M:%S} to "
                            f"{caller.valid_until:%Y-%m-%d %H:%M:%S} UTC, not now; renew the kit and reconnect")

    def _decide(self, method: str, caller: Caller) -> Callable[[], None]:
        """Standing (revocation, dates), role, then the party's policy; returns the policy's release callback."""
        self._check_standing(caller)
        if method.startswith(OPEN_SERVICES):
            return _nothing
        allowed = self.roles_by_rpc.get(method)
        if allowed is None:
            raise SiloError(ErrorCode.PERMISSION_DENIED, f"{method} is not in this server's roles table")
        if caller.identity.role not in allowed:
            raise SiloError(ErrorCode.PERMISSION_DENIED, f"role {caller.identity.role.value} may not call {method} "
                            f"(allowed: {', '.join(sorted(r.value for r in allowed))})")
        return self.admission.admit(caller, method) if self.admission is not None else _nothing

    def _finish(self, context: grpc.ServicerContext, method: str, caller: Caller | None, request: Any,
                decision: str, code: str, reason: str, started: float) -> None:
        """Record the call and attach the log's checkpoint; INTERNAL (raised) if it cannot be recorded."""
        if self.audit is None:
            return
        try:
            facts = serde.call_facts(method, _raw(request))
            self.audit.record({"event": "call", "side": "server", "rpc": method,
                               "caller": None if caller is None else caller.identity.uri,
                               "serial": None if caller is None else f"{caller.serial:x}",
                               "round_id": facts.round_id, "objective": facts.objective,
                               "request_digest": facts.request_digest, "items": facts.items,
                               "decision": decision, "status": code, "reason": serde.bounded_text(reason),
                               "latency_ms": round((time.perf_counter() - started) * 1e3, 3)})
            checkpoint = self.audit.latest_checkpoint()
        except Exception:  # noqa: BLE001 - an unrecorded call must not be answered
            logger.exception("audit log failed to record %s; refusing the call", method)
            context.abort(grpc.StatusCode.INTERNAL, "this party could not record the call in its audit log; "
                          "nothing was answered")
        if checkpoint is not None:
            context.set_trailing_metadata(((CHECKPOINT_METADATA,
                                            serde.checkpoint_to_proto(checkpoint).SerializeToString()),))

    def _guarded(self, method: str, behaviour: Callable, streaming_response: bool,
                 parse: Callable[[bytes], Any] | None) -> Callable:
        """`behaviour` behind the decision and the audit; `parse` turns a single request's bytes into the message
        it takes (None: it takes what arrives, raw bytes or a request stream)."""
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            caller = None
            try:
                caller = peer_caller(context)
                release = self._decide(method, caller)
            except SiloError as error:
                self._finish(context, method, caller, request, "refused", error.code.value, error.message, started)
                abort_with(context, error)
            message = request
            if parse is not None:
                try:
                    message = parse(request)
                except Exception as exc:  # noqa: BLE001 - any parser failure is the request's fault
                    release()
                    error = invalid(f"the request is not a valid {method} message ({type(exc).__name__})")
                    self._finish(context, method, caller, request, "refused", error.code.value, error.message,
                                 started)
                    abort_with(context, error)
            if streaming_response:
                # Health Watch and reflection streams: admitted now, no policy slot held while they stream.
                release()
                return self._open_stream(method, behaviour, request, message, context, caller, started)
            try:
                response = behaviour(message, context)
            except SiloError as error:
                release()  # the party's own refusal (bad input, a policy limit the handler checks)
                self._finish(context, method, caller, request, "refused", error.code.value, error.message, started)
                abort_with(context, error)
            except BaseException as exc:  # noqa: BLE001 - a bug must answer INTERNAL, never kill the server
                # BaseException too: a SystemExit from a library in this worker thread went past an `except
                # Exception` to gRPC, which never answered (the caller waited for its deadline), nothing was
                # recorded, and the policy slot stayed taken until the silo restarted.
                release()
                ended = _status_set_by_handler(context)
                if ended is not None:  # context.abort, or set_code then raise: gRPC answers that status
                    self._finish(context, method, caller, request, "failed", *ended, started)
                    raise
                logger.exception("%s failed for %s", method, caller.identity)
                self._finish(context, method, caller, request, "failed", "INTERNAL", type(exc).__name__, started)
                context.abort(grpc.StatusCode.INTERNAL, "internal error on the server; it has been logged")
            release()
            code, reason = _status_set_by_handler(context) or ("OK", "")  # e.g. Health/Check's NOT_FOUND
            self._finish(context, method, caller, request, "admitted", code, reason, started)
            return response

        return run

    def _open_stream(self, method: str, behaviour: Callable, request: Any, message: Any,
                     context: grpc.ServicerContext, caller: Caller, started: float) -> Any:
        """The stream, if fewer than `max_open_streams` are open (RESOURCE_EXHAUSTED otherwise).

        Each open stream holds one of the server's worker threads until it
        ends, so without a cap any consortium member could open as many as
        there are workers and the server would answer nothing else.
        """
        if not self._open_streams.acquire(blocking=False):
            error = SiloError(ErrorCode.RESOURCE_EXHAUSTED, f"{self.max_open_streams} streams (health Watch, "
                              "reflection) are already open on this server; close one and retry")
            self._finish(context, method, caller, request, "refused", error.code.value, error.message, started)
            abort_with(context, error)
        closed = _once(self._open_streams.release)
        try:
            self._finish(context, method, caller, request, "admitted", "OK", "stream opened", started)
            context.add_callback(closed)  # however the stream ends: done, cancelled, deadline, server stop
            return self._streamed(behaviour(message, context), closed, method, caller, request, context, started)
        except BaseException:
            closed()
            raise

    def _streamed(self, responses: Iterator[Any], closed: Callable[[], None], method: str, caller: Caller,
                  request: Any, context: grpc.ServicerContext, started: float) -> Iterator[Any]:
        """`responses`, each sent only while the caller's certificate is unrevoked and in date (UNAUTHENTICATED
        ends it)."""
        try:
            for response in responses:
                try:
                    self._check_standing(caller)
                except SiloError as error:
                    self._finish(context, method, caller, request, "refused", error.code.value,
                                 f"{error.message}; its open stream was ended", started)
                    abort_with(context, error)
                yield response
        finally:
            closed()

    def _unknown_method(self, method: str) -> Callable:
        """A call to a method this server does not have: the caller's standing first (a revoked party learns
        nothing of which methods exist), then UNIMPLEMENTED; refused either way, and on record. The name is the
        caller's text, so it is recorded bounded, as every other text a caller chooses."""
        method = serde.bounded_text(method)

        def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            caller = None
            try:
                caller = peer_caller(context)
                self._check_standing(caller)
                error = SiloError(ErrorCode.UNIMPLEMENTED, f"this server has no method {method}")
            except SiloError as refusal:
                error = refusal
            self._finish(context, method, caller, b"", "refused", error.code.value, error.message, started)
            abort_with(context, error)

        return run

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None:  # no such method: still identified, checked and on record, then UNIMPLEMENTED
            # Stream in, stream out: it takes a call of any of the four kinds without reading its messages.
            return grpc.stream_stream_rpc_method_handler(self._unknown_method(method))
        kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler, False),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler, True))
        for attribute, make, streaming_response in kinds:
            behaviour = getattr(handler, attribute)
            if behaviour is not None:
                # A single request arrives as bytes and is parsed after the decision; a request stream is parsed
                # message by message as the handler reads it, which is after the decision already.
                single_request = attribute.startswith("unary_")
                return make(self._guarded(method, behaviour, streaming_response,
                                          handler.request_deserializer if single_request else None),
                            request_deserializer=None if single_request else handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler  # pragma: no cover - grpc has exactly the four kinds above


def _nothing() -> None:
    return None


def _once(action: Callable[[], None]) -> Callable[[], None]:
    """`action`, run at most once however many times the result is called (from any thread)."""
    lock, done = threading.Lock(), []

    def run() -> None:
        with lock:
            if done:
                return
            done.append(True)
        action()

    return run


def _raw(request: Any) -> bytes:
    """The request's serialised bytes (every single request arrives as bytes; a request stream has none)."""
    if isinstance(request, bytes):
        return request
    serialize = getattr(request, "SerializeToString", None)
    return serialize() if callable(serialize) else b""  # a request stream: nothing single to digest


def _status_set_by_handler(context: grpc.ServicerContext) -> tuple[str, str] | None:
    """(code name, details) of a status the handler set itself (`context.abort` or `set_code`), else None.

    Read from the context, not from the exception: grpcio's `abort` raises a
    bare `Exception` (1.85), so only the context tells an abort from a bug.
    """
    code = context.code()
    if code is None or code == grpc.StatusCode.OK:
        return None
    details = context.details()
    return code.name, details.decode("utf-8", "replace") if isinstance(details, bytes) else (details or "")
