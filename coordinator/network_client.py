"""`NetworkSiloClient`: a `SiloClient` reaching a silo's `mor silo serve` over mutual TLS.

Each call has a deadline. A call that fails with UNAVAILABLE (the silo is
restarting, or the connection dropped) is retried with exponential backoff,
a bounded number of times, each time on a fresh channel: a channel that saw
its silo die waits out gRPC's reconnect backoff before trying again, so a
silo that came back would otherwise stay unused for seconds. Every other
status is the silo's answer and is raised at once as `SiloError` with that
code (retrying a refusal would only spend the silo's rate limit).
`SecureScore` and `Decrypt` are never retried: the silo records their round
id before it answers, so a retry of one that reached it is refused as a
replay; secure fusion restarts the round under a new id instead, or asks
the next decryptor.

With `audit=` (the coordinator's log) every attempt, retries included, is an
entry in the coordinator's log, holding the checkpoint the silo's answer
carried (mor_secure/transport/client_audit.py).
"""

from __future__ import annotations

import logging
import time
from typing import TypeVar

import grpc

from mor_secure.pki.identity import PartyIdentity, Role
from mor_secure.pki.kits import CertKit
from mor_secure.transport.authorization import AuditSink
from mor_secure.proto.v1 import silo_pb2, silo_pb2_grpc
from mor_secure.transport.channel import as_silo_error, secure_channel
from mor_secure.wire import serde
from mor_secure.wire.errors import ErrorCode
from mor_secure.wire.messages import (
    AgreementKeyReply,
    BitsReply,
    BitsRequest,
    DecryptReply,
    DecryptRequest,
    ScoreReply,
    ScoreRequest,
    SecureScoreReply,
    SecureScoreRequest,
    SiloDescription,
)

logger = logging.getLogger(__name__)
# Calls a silo answers once per round id (silo_agent/secure_rounds.py): not retried (see the module docstring).
ONCE_PER_ROUND = frozenset({"SecureScore", "Decrypt"})
T = TypeVar("T")

# A GRPO step's Score call takes well under a second on the demo's silos; 60 s leaves room for a
# first call that fills a silo's feature caches, and still fails a hung silo within one round.
DEFAULT_DEADLINE_S = 60.0
DEFAULT_RETRIES = 3
# Backoff 0.2 s, 0.4 s, 0.8 s: a silo restarting on the same port is back within ~1.5 s in the tests.
BACKOFF_S = 0.2


class NetworkSiloClient:
    """One silo at `address`, reached with the coordinator's (or an auditor's) kit."""

    def __init__(self, name: str, address: str, kit: CertKit, *, deadline_s: float = DEFAULT_DEADLINE_S,
                 retries: int = DEFAULT_RETRIES, audit: AuditSink | None = None) -> None:
        self._name = name
        self.address = address
        self.kit = kit
        self.audit = audit
        self.deadline_s = deadline_s
        self.retries = retries
        self._connect()

    def _connect(self) -> None:
        self._channel = secure_channel(self.address, self.kit, expect=PartyIdentity(Role.SILO, self._name),
                                       audit=self.audit)
        self._stub = silo_pb2_grpc.SiloRewardServiceStub(self._channel)

    @property
    def name(self) -> str:
        return self._name

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: object) -> T:
        attempt = 0
        while True:
            try:
                return getattr(self._stub, method)(request, timeout=self.deadline_s)
            except grpc.RpcError as error:
                failure = as_silo_error(error, self._name)
                if failure.code == ErrorCode.UNAVAILABLE:
                    self._channel.close()
                    self._connect()  # the next call (retry, or the next round) dials afresh
                if failure.code != ErrorCode.UNAVAILABLE or attempt >= self.retries or method in ONCE_PER_ROUND:
                    raise failure from None
                delay = BACKOFF_S * 2 ** attempt
                logger.info("silo %s unavailable (%s); retrying in %.1f s", self._name, error.details(), delay)
                time.sleep(delay)
                attempt += 1

    def describe(self) -> SiloDescription:
        return serde.description_from_proto(self._call("Describe", silo_pb2.DescribeRequest()))

    def score(self, request: ScoreRequest) -> ScoreReply:
        return serde.score_reply_from_proto(self._call("Score", serde.score_request_to_proto(request)))

    def correctness_bits(self, request: BitsRequest) -> BitsReply:
        return serde.bits_reply_from_proto(self._call("CorrectnessBits", serde.bits_request_to_proto(request)))

    def agreement_key(self) -> AgreementKeyReply:
        return serde.agreement_key_reply_from_proto(self._call("AgreementKey", silo_pb2.AgreementKeyRequest()))

    def secure_score(self, request: SecureScoreRequest) -> SecureScoreReply:
        return serde.secure_score_reply_from_proto(self._call("SecureScore",
                                                              serde.secure_score_request_to_proto(request)))

    def decrypt(self, request: DecryptRequest) -> DecryptReply:
        return serde.decrypt_reply_from_proto(self._call("Decrypt", serde.decrypt_request_to_proto(request)))
