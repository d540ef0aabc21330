"""The only converter between wire domain types (mor_secure.wire.messages) and protobuf messages.

Decoding is where bytes from the network become domain values, so it refuses
what the domain cannot hold: text that is not UTF-8, a digest that is not 32
bytes. Those become `SiloError(INVALID_ARGUMENT)` naming the field; checks
that need the silo's policy (counts, sizes, pixels) belong to the silo's
service, which both transports share.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from mor_secure.audit.checkpoints import SignedCheckpoint
from mor_secure.privacy.reports import PrivacyReport
from mor_secure.proto.v1 import silo_pb2 as pb

from .errors import invalid
from .messages import (
    AgreementKeyReply,
    BitsPair,
    BitsReply,
    BitsRequest,
    DecryptReply,
    DecryptRequest,
    ImageBlob,
    LedgerSummary,
    Participant,
    ScoreReply,
    ScoreRequest,
    ScoreRow,
    SecureScoreReply,
    SecureScoreRequest,
    SiloDescription,
)

_SHA256_BYTES = 32
# Round ids are 32 hex characters (coordinator.audit_trail.new_round_id); a longer one is refused, so that what
# a caller sends cannot grow every party's audit entries (round_id is the one request field they record).
MAX_ROUND_ID_BYTES = 128
# Caller-influenced text in an audit entry (the objective, a refusal's reason) is cut to this many characters.
MAX_AUDIT_TEXT = 256


def bounded_text(text: str, limit: int = MAX_AUDIT_TEXT) -> str:
    """`text` if short; else its first `limit` characters, how many more there were and the digest of the whole."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()
    return f"{text[:limit]}... ({len(text) - limit} more characters, sha256 {digest})"


def _text(value: bytes, field: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"{field} is not valid UTF-8 text") from None


def _round_id(value: bytes) -> str:
    if len(value) > MAX_ROUND_ID_BYTES:
        raise invalid(f"round_id is {len(value)} bytes; a round id has at most {MAX_ROUND_ID_BYTES}")
    return _text(value, "round_id")


def _images_to_proto(images: tuple[ImageBlob, ...]) -> list[pb.ImageBlob]:
    return [pb.ImageBlob(sha256=i.sha256_bytes(), data=i.data) for i in images]


def _images_from_proto(images) -> tuple[ImageBlob, ...]:
    out = []
    for index, image in enumerate(images):
        if len(image.sha256) != _SHA256_BYTES:
            raise invalid(f"images[{index}].sha256 is {len(image.sha256)} bytes; a SHA-256 digest is 32")
        out.append(ImageBlob(sha256=image.sha256.hex(), data=image.data))
    return tuple(out)


def score_request_to_proto(request: ScoreRequest) -> pb.ScoreRequest:
    return pb.ScoreRequest(round_id=request.round_id.encode("utf-8"), objective=request.objective,
                           images=_images_to_proto(request.images), weights=list(request.weights),
                           rows=[pb.ScoreRow(image=r.image, prompt=r.prompt.encode("utf-8"),
                                             response=r.response.encode("utf-8")) for r in request.rows])


def score_request_from_proto(message: pb.ScoreRequest) -> ScoreRequest:
    return ScoreRequest(images=_images_from_proto(message.images),
                        rows=tuple(ScoreRow(image=r.image, prompt=_text(r.prompt, f"rows[{i}].prompt"),
                                            response=_text(r.response, f"rows[{i}].response"))
                                   for i, r in enumerate(message.rows)),
                        round_id=_round_id(message.round_id), objective=message.objective,
                        weights=tuple(message.weights))


def score_reply_to_proto(reply: ScoreReply) -> pb.ScoreReply:
    return pb.ScoreReply(scores=list(reply.scores))


def score_reply_from_proto(message: pb.ScoreReply) -> ScoreReply:
    return ScoreReply(scores=tuple(float(s) for s in message.scores))


def bits_request_to_proto(request: BitsRequest) -> pb.BitsRequest:
    message = pb.BitsRequest(round_id=request.round_id.encode("utf-8"), objective=request.objective,
                             images=_images_to_proto(request.images),
                             pairs=[pb.BitsPair(image=p.image, prompt=p.prompt.encode("utf-8"),
                                                chosen=p.chosen.encode("utf-8"), rejected=p.rejected.encode("utf-8"))
                                    for p in request.pairs])
    if request.randomized_response_epsilon is not None:
        message.randomized_response_epsilon = request.randomized_response_epsilon
    return message


def bits_request_from_proto(message: pb.BitsRequest) -> BitsRequest:
    pairs = tuple(BitsPair(image=p.image, prompt=_text(p.prompt, f"pairs[{i}].prompt"),
                           chosen=_text(p.chosen, f"pairs[{i}].chosen"), rejected=_text(p.rejected, f"pairs[{i}].rejected"))
                  for i, p in enumerate(message.pairs))
    epsilon = message.randomized_response_epsilon if message.HasField("randomized_response_epsilon") else None
    return BitsRequest(images=_images_from_proto(message.images), pairs=pairs, randomized_response_epsilon=epsilon,
                       round_id=_round_id(message.round_id), objective=message.objective)


def bits_reply_to_proto(reply: BitsReply) -> pb.BitsReply:
    message = pb.BitsReply(bits=list(reply.bits))
    if reply.flip_probability is not None:
        message.flip_probability = reply.flip_probability
    return message


def bits_reply_from_proto(message: pb.BitsReply) -> BitsReply:
    return BitsReply(bits=tuple(bool(b) for b in message.bits),
                     flip_probability=message.flip_probability if message.HasField("flip_probability") else None)


def _optional(message, field: str):
    return getattr(message, field) if message.HasField(field) else None


def _report_to_proto(report: PrivacyReport) -> pb.PrivacyReport:
    message = pb.PrivacyReport(dp_enabled=report.dp_enabled, epsilon=report.epsilon, delta=report.delta,
                               noise_multiplier=report.noise_multiplier, sample_rate=report.sample_rate,
                               steps=report.steps, epochs=report.epochs, is_private=report.private,
                               mechanisms=list(report.mechanisms))
    for field in ("max_grad_norm", "accountant", "privacy_unit", "max_pairs_per_unit", "noise"):
        if getattr(report, field) is not None:
            setattr(message, field, getattr(report, field))
    return message


def _report_from_proto(message: pb.PrivacyReport) -> PrivacyReport:
    return PrivacyReport(dp_enabled=message.dp_enabled, epsilon=message.epsilon, delta=message.delta,
                         noise_multiplier=message.noise_multiplier, sample_rate=message.sample_rate,
                         steps=message.steps, epochs=message.epochs,
                         max_grad_norm=_optional(message, "max_grad_norm"), accountant=_optional(message, "accountant"),
                         privacy_unit=_optional(message, "privacy_unit"),
                         max_pairs_per_unit=_optional(message, "max_pairs_per_unit"),
                         noise=_optional(message, "noise"), private=message.is_private,
                         mechanisms=tuple(message.mechanisms))


def description_to_proto(description: SiloDescription) -> pb.SiloDescription:
    message = pb.SiloDescription(name=description.name, architecture=description.architecture,
                                 trainable_params=description.trainable_params)
    if description.privacy_report is not None:
        message.privacy_report.CopyFrom(_report_to_proto(description.privacy_report))
    if description.ledger is not None:
        ledger = description.ledger
        message.ledger.CopyFrom(pb.LedgerSummary(
            epsilon_budget=ledger.epsilon_budget, delta_budget=ledger.delta_budget,
            epsilon_spent=ledger.epsilon_spent, delta_spent=ledger.delta_spent, charges=ledger.charges,
            open_reservations=ledger.open_reservations, head_digest=ledger.head_digest))
    return message


def description_from_proto(message: pb.SiloDescription) -> SiloDescription:
    ledger = None
    if message.HasField("ledger"):
        m = message.ledger
        ledger = LedgerSummary(epsilon_budget=m.epsilon_budget, delta_budget=m.delta_budget,
                               epsilon_spent=m.epsilon_spent, delta_spent=m.delta_spent, charges=m.charges,
                               open_reservations=m.open_reservations, head_digest=m.head_digest)
    return SiloDescription(name=message.name, architecture=message.architecture,
                           trainable_params=message.trainable_params,
                           privacy_report=_report_from_proto(message.privacy_report)
                           if message.HasField("privacy_report") else None,
                           ledger=ledger)


def checkpoint_to_proto(checkpoint: SignedCheckpoint) -> pb.SignedCheckpoint:
    return pb.SignedCheckpoint(body=checkpoint.body, signature=checkpoint.signature)


def checkpoint_from_proto(message: pb.SignedCheckpoint) -> SignedCheckpoint:
    return SignedCheckpoint(body=bytes(message.body), signature=bytes(message.signature))


@dataclass(frozen=True)
class CallFacts:
    """What an audit entry records of a request: its digest and counts, never its contents."""

    request_digest: str
    round_id: str = ""
    objective: str = ""
    items: int = 0


_REQUEST_TYPES = {"Score": (pb.ScoreRequest, "rows"), "CorrectnessBits": (pb.BitsRequest, "pairs"),
                  "SecureScore": (pb.SecureScoreRequest, "score.rows"), "Decrypt": (pb.DecryptRequest, "ciphertexts")}
_SERVICE_PREFIX = "/" + pb.DESCRIPTOR.services_by_name["SiloRewardService"].full_name + "/"


def call_facts(method: str, raw: bytes) -> CallFacts:
    """The audit facts of a call to `method` (a full gRPC method name) whose serialised request is `raw`.

    Both ends compute it from the same bytes (the silo from what arrived, the
    coordinator from what it sent), so their logs can be matched by digest.
    A request that does not parse still gets its digest.
    """
    digest = hashlib.sha256(raw).hexdigest()
    kind = _REQUEST_TYPES.get(method.removeprefix(_SERVICE_PREFIX)) if method.startswith(_SERVICE_PREFIX) else None
    if kind is None:
        return CallFacts(request_digest=digest)
    message_type, items = kind
    try:
        message = message_type.FromString(raw)
    except DecodeError:
        return CallFacts(request_digest=digest)
    inner = message.score if message_type is pb.SecureScoreRequest else message
    rows = message
    for field in items.split("."):
        rows = getattr(rows, field)
    # Bounded as the parties record them: the request itself may be refused for a round id or objective too long.
    round_id = bytes(inner.round_id)
    round_text = round_id[:MAX_ROUND_ID_BYTES + 1].decode("utf-8", "replace")
    if len(round_id) > MAX_ROUND_ID_BYTES:
        round_text = (f"{round_text[:MAX_ROUND_ID_BYTES]}... ({len(round_id)} bytes, sha256 "
                      f"{hashlib.sha256(round_id).hexdigest()})")
    return CallFacts(request_digest=digest, round_id=round_text,
                     objective=bounded_text(getattr(inner, "objective", "")), items=len(rows))


def agreement_key_reply_to_proto(reply: AgreementKeyReply) -> pb.AgreementKeyReply:
    return pb.AgreementKeyReply(agreement_key=reply.agreement_key, certificate_pem=reply.certificate_pem)


def agreement_key_reply_from_proto(message: pb.AgreementKeyReply) -> AgreementKeyReply:
    return AgreementKeyReply(agreement_key=message.agreement_key, certificate_pem=bytes(message.certificate_pem))


def secure_score_request_to_proto(request: SecureScoreRequest) -> pb.SecureScoreRequest:
    return pb.SecureScoreRequest(score=score_request_to_proto(request.score), participants=[
        pb.Participant(name=p.name, agreement_key=p.agreement_key, certificate_pem=p.certificate_pem)
        for p in request.participants])


def secure_score_request_from_proto(message: pb.SecureScoreRequest) -> SecureScoreRequest:
    return SecureScoreRequest(score=score_request_from_proto(message.score), participants=tuple(
        Participant(name=p.name, agreement_key=p.agreement_key, certificate_pem=bytes(p.certificate_pem))
        for p in message.participants))


def secure_score_reply_to_proto(reply: SecureScoreReply) -> pb.SecureScoreReply:
    return pb.SecureScoreReply(ciphertexts=list(reply.ciphertexts))


def secure_score_reply_from_proto(message: pb.SecureScoreReply) -> SecureScoreReply:
    return SecureScoreReply(ciphertexts=tuple(bytes(c) for c in message.ciphertexts))


def decrypt_request_to_proto(request: DecryptRequest) -> pb.DecryptRequest:
    return pb.DecryptRequest(round_id=request.round_id.encode("utf-8"), participants=list(request.participants),
                             ciphertexts=list(request.ciphertexts))


def decrypt_request_from_proto(message: pb.DecryptRequest) -> DecryptRequest:
    return DecryptRequest(round_id=_round_id(message.round_id), participants=tuple(message.participants),
                          ciphertexts=tuple(bytes(c) for c in message.ciphertexts))


def decrypt_reply_to_proto(reply: DecryptReply) -> pb.DecryptReply:
    return pb.DecryptReply(values=[pb.Plaintext(values=list(v)) for v in reply.values])


def decrypt_reply_from_proto(message: pb.DecryptReply) -> DecryptReply:
    return DecryptReply(values=tuple(tuple(int(x) for x in v.values) for v in message.values))
