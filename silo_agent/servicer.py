"""The silo's gRPC servicer: serde on the way in and out, the shared `SiloService` in between.

It is as thin as the in-process client: the same service object makes every
decision, so both paths answer alike (tests/contract/). Refusals raised as
`SiloError` become the status of the same name in the authorizing wrapper
(mor_secure/transport/authorization.py), which also wraps every method here.

Requests arrive as raw bytes and are parsed here, not by gRPC: bytes that are
not a valid message then answer INVALID_ARGUMENT naming the message type,
where gRPC's own deserializer would answer INTERNAL. Every RPC's raw length is
checked against the policy's `max_request_bytes` before it is parsed (unknown
fields make any message, an empty DescribeRequest too, as large as a caller likes),
and a request's repeated fields against the policy's counts (a secure round's
participants and ciphertexts against the protocol's) before they are
converted: 8 MiB of empty rows is 4 million of them, 13 s and 750 MB of
dataclasses to build before the service's own count check refused them.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

from mor_secure.pki.identity import Role
from mor_secure.proto.v1 import silo_pb2, silo_pb2_grpc
from mor_secure.wire import serde
from mor_secure.wire.errors import ErrorCode, SiloError, invalid

from .request_checks import check_at_most
from .secure_rounds import SecureRounds, check_ciphertext_count, check_participant_count, no_secure_rounds
from .service import SiloService

SERVICE_NAME = silo_pb2.DESCRIPTOR.services_by_name["SiloRewardService"].full_name
# Who may call what on a silo. Every RPC of the service must be here (a test enumerates them).
ROLES_BY_RPC: dict[str, frozenset[Role]] = {
    f"/{SERVICE_NAME}/Describe": frozenset({Role.COORDINATOR, Role.AUDITOR}),
    f"/{SERVICE_NAME}/Score": frozenset({Role.COORDINATOR}),
    f"/{SERVICE_NAME}/CorrectnessBits": frozenset({Role.COORDINATOR}),
    f"/{SERVICE_NAME}/AgreementKey": frozenset({Role.COORDINATOR}),
    f"/{SERVICE_NAME}/SecureScore": frozenset({Role.COORDINATOR}),
    f"/{SERVICE_NAME}/Decrypt": frozenset({Role.COORDINATOR}),
}


class SiloServicer(silo_pb2_grpc.SiloRewardServiceServicer):
    """SiloRewardService over a `SiloService` (None while the silo is still loading its model)."""

    def __init__(self, service: SiloService | None, *, secure: SecureRounds | None = None) -> None:
        self._service = service
        self._secure = secure

    def ready(self, service: SiloService, *, secure: SecureRounds | None = None) -> None:
        """The model is loaded: start answering (health turns SERVING separately)."""
        self._service = service
        self._secure = secure

    @property
    def service(self) -> SiloService:
        if self._service is None:
            raise SiloError(ErrorCode.FAILED_PRECONDITION, "this silo is still loading its reward model; "
                            "wait for health SERVING")
        return self._service

    def Describe(self, request: silo_pb2.DescribeRequest, context: grpc.ServicerContext) -> silo_pb2.SiloDescription:
        return serde.description_to_proto(self.service.describe())

    def check_size(self, size: int) -> None:
        """A serialised request of `size` bytes is within the policy's max_request_bytes (INVALID_ARGUMENT)."""
        limit = self.service.limits.max_request_bytes
        if size > limit:
            raise invalid(f"request is {size} bytes; this silo's policy allows at most {limit} (split it)")

    def check_counts(self, request: silo_pb2.ScoreRequest | silo_pb2.BitsRequest) -> None:
        """The request's repeated fields within the policy's counts, before serde builds an object for each (the
        service checks them again, with the rest of the request: an empty one, say)."""
        limits = self.service.limits
        check_at_most("images", len(request.images), limits.max_images)
        for label in ("rows", "weights", "pairs"):
            if label in request.DESCRIPTOR.fields_by_name:
                check_at_most(label, len(getattr(request, label)), limits.max_items)

    def Score(self, request: silo_pb2.ScoreRequest, context: grpc.ServicerContext) -> silo_pb2.ScoreReply:
        self.check_counts(request)
        return serde.score_reply_to_proto(self.service.score(serde.score_request_from_proto(request)))

    def CorrectnessBits(self, request: silo_pb2.BitsRequest, context: grpc.ServicerContext) -> silo_pb2.BitsReply:
        self.check_counts(request)
        return serde.bits_reply_to_proto(self.service.correctness_bits(serde.bits_request_from_proto(request)))

    @property
    def secure(self) -> SecureRounds:
        self.service  # noqa: B018 - FAILED_PRECONDITION while the model loads, as for every RPC
        return no_secure_rounds(self.service.name) if self._secure is None else self._secure

    def AgreementKey(self, request: silo_pb2.AgreementKeyRequest,
                     context: grpc.ServicerContext) -> silo_pb2.AgreementKeyReply:
        return serde.agreement_key_reply_to_proto(self.secure.agreement_key())

    def SecureScore(self, request: silo_pb2.SecureScoreRequest,
                    context: grpc.ServicerContext) -> silo_pb2.SecureScoreReply:
        self.check_counts(request.score)
        check_participant_count(len(request.participants))
        secure_request = serde.secure_score_request_from_proto(request)
        return serde.secure_score_reply_to_proto(self.secure.secure_score(secure_request))

    def Decrypt(self, request: silo_pb2.DecryptRequest, context: grpc.ServicerContext) -> silo_pb2.DecryptReply:
        self.service  # noqa: B018 - FAILED_PRECONDITION while the model loads, before anything else
        check_participant_count(len(request.participants))
        check_ciphertext_count(len(request.ciphertexts))
        return serde.decrypt_reply_to_proto(self.secure.decrypt(serde.decrypt_request_from_proto(request)))


def _parsed(servicer: SiloServicer, behaviour: Callable, message_class: type) -> Callable:
    def handle(raw: bytes, context: grpc.ServicerContext):
        servicer.check_size(len(raw))
        try:
            request = message_class.FromString(raw)
        except DecodeError:
            raise invalid(f"the request is not a valid {message_class.DESCRIPTOR.full_name} message") from None
        return behaviour(request, context)
    return handle


def add_to_server(servicer: SiloServicer, server: grpc.Server) -> None:
    """Register every RPC of SiloRewardService, taking raw request bytes (size-checked and parsed in `_parsed`)."""
    service = silo_pb2.DESCRIPTOR.services_by_name["SiloRewardService"]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            _parsed(servicer, getattr(servicer, method.name), getattr(silo_pb2, method.input_type.name)),
            request_deserializer=None,
            response_serializer=getattr(silo_pb2, method.output_type.name).SerializeToString)
        for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def servicer_registration(servicer: SiloServicer | SiloService, *, secure: SecureRounds | None = None) -> tuple:
    """(add_to_server, servicer, service name) for `mor_secure.transport.server.serve`."""
    if isinstance(servicer, SiloService):
        servicer = SiloServicer(servicer, secure=secure)
    return add_to_server, servicer, SERVICE_NAME
