"""The calling side's audit: every call a party makes over a channel is one entry in its own log.

`secure_channel(..., audit=log)` installs `AuditingClientInterceptor`, so no
call on that channel can skip it. The entry holds what the called party's
entry holds (RPC, round, objective, request digest, item count, status,
latency; `serde.call_facts` on the very bytes sent), the party called, how
many entries the log held when the call was sent (reconcile orders it after
the answers recorded before it), and the signed checkpoint its answer
carried in the trailing metadata: the called party's tree head, which it
can later only extend (`mor audit reconcile` checks). A call that could not be recorded raises:
a coordinator must not use an answer that is not on its record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from mor_secure.pki.identity import PartyIdentity
from mor_secure.proto.v1 import silo_pb2
from mor_secure.wire import serde

from .authorization import CHECKPOINT_METADATA, AuditSink


def _held_checkpoint(metadata) -> dict[str, str] | None:
    for key, value in metadata or ():
        if key == CHECKPOINT_METADATA:
            try:
                signed = serde.checkpoint_from_proto(silo_pb2.SignedCheckpoint.FromString(value))
            except DecodeError:
                return {"unreadable": value.hex()[:256]}
            return {"body": signed.body.hex(), "signature": signed.signature.hex()}
    return None


class AuditingClientInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Records each unary call made to `callee` (the identity the channel's TLS pins) in `audit`."""

    def __init__(self, audit: AuditSink, callee: PartyIdentity) -> None:
        self.audit = audit
        self.callee = callee

    def intercept_unary_unary(self, continuation: Callable, client_call_details: Any, request: Any) -> Any:
        started, sent_after = time.perf_counter(), self.audit.size
        facts = serde.call_facts(client_call_details.method, request.SerializeToString())
        outcome = continuation(client_call_details, request)
        try:
            outcome.result()
            status, reason = "OK", ""
        except grpc.RpcError as error:
            status, reason = error.code().name, error.details() or ""
        self.audit.record({"event": "call", "side": "client", "rpc": client_call_details.method,
                           "callee": self.callee.uri, "round_id": facts.round_id, "objective": facts.objective,
                           "request_digest": facts.request_digest, "items": facts.items, "status": status,
                           "reason": serde.bounded_text(reason), "sent_after_entries": sent_after,
                           "latency_ms": round((time.perf_counter() - started) * 1e3, 3),
                           "peer_checkpoint": _held_checkpoint(outcome.trailing_metadata())})
        return outcome
