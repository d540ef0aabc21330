"""Signed checkpoints: a party's signed statement "the first `size` entries of my log have Merkle root `root`".

A checkpoint (a signed tree head, as in RFC 6962 §3.5) is what makes a log
tamper-evident to others: once a silo has handed the coordinator a
checkpoint, every later state of its log must extend that tree
(a consistency proof shows it), so an entry rewritten afterwards is caught
by reconciliation even if the silo re-signs its own checkpoints.

The signed bytes are the checkpoint's canonical JSON body, kept verbatim
(never re-serialised before verifying), signed with ECDSA P-256 / SHA-256
by the private key of the party's certificate kit. The body names the
signing key by the SHA-256 of its SubjectPublicKeyInfo, so a log that
outlives a renewed kit still names which certificate verifies each
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mor_secure.pki.kits import CertKit, identity_of

logger = logging.getLogger(__name__)
FORMAT = "mor-secure/audit-checkpoint/v1"
# The most entries any writer lets pass between two checkpoints: `log.AuditLog` refuses a longer cadence, so a
# checkpoint that states none (signed before 2026-12-07) still bounds its writer's unsigned stretch.
MAX_CHECKPOINT_INTERVAL = 256
_ROOT_BYTES = 32
# A silo signs a checkpoint with every answer; looking at its kit's files each time was 4 stat calls, ~0.09 ms of
# a 20 ms Score call (benchmarks/audit.py). A renewal is rare and the old certificate stays valid (and in the log),
# so signing with it for up to a second more is harmless.
KIT_CHECK_SECONDS = 1.0


class CheckpointError(ValueError):
    """A checkpoint that does not parse, names an unknown key, or whose signature does not verify."""


def canonical_json(value: object) -> bytes:
    """The one byte form of a JSON value that is hashed or signed: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 is JSON grammar, but beyond a float: Python reads it as infinity
        raise ValueError(f"{text} is beyond the range of a float")
    return value


def parse_json(body: bytes) -> object:
    """`body` as JSON, refusing what `canonical_json` never writes: NaN and Infinity, a number beyond float range
    (1e400), or nesting deeper than the parser's recursion allows (a crafted body must read as malformed, never
    crash the reader); ValueError if not."""
    try:
        return json.loads(body.decode("ascii"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply to be anything the log writes") from None


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Hex SHA-256 of the key's DER SubjectPublicKeyInfo: how a checkpoint names its signing key."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """The log of party `log` had `size` entries with Merkle root `root` at `time` (UNIX seconds).

    `signs_every`: the writer signs at least every this many entries, so it
    never leaves more than `signs_every - 1` newer entries unsigned; signed
    with the head, so `mor audit verify` holds the log to its own writer's
    cadence (a silo signs every entry: 1). None in checkpoints signed before
    2026-12-07, which said nothing of it.
    """

    log: str
    size: int
    root: bytes
    time: float
    key: str
    signs_every: int | None = None

    @property
    def unsigned_allowed(self) -> int:
        """How many newer entries its writer may leave unsigned after it: signs_every - 1 (at most 255)."""
        return min(self.signs_every or MAX_CHECKPOINT_INTERVAL, MAX_CHECKPOINT_INTERVAL) - 1

    def body(self) -> bytes:
        fields = {"format": FORMAT, "log": self.log, "size": self.size, "root": self.root.hex(), "time": self.time,
                  "key": self.key}
        if self.signs_every is not None:
            fields["signs_every"] = self.signs_every
        return canonical_json(fields)

    @classmethod
    def parse(cls, body: bytes) -> Checkpoint:
        try:
            fields = parse_json(body)
            if not isinstance(fields, dict) or fields.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} checkpoint")
            every = fields.get("signs_every")
            checkpoint = cls(log=str(fields["log"]), size=int(fields["size"]), root=bytes.fromhex(fields["root"]),
                             time=float(fields["time"]), key=str(fields["key"]),
                             signs_every=None if every is None else int(every))
            canonical = checkpoint.body()
        # ValueError (UnicodeDecodeError is one) from the parser or the conversions; OverflowError: an integer time
        # beyond float range; RecursionError: a field nested as deep as the parser allows, too deep to re-encode.
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise CheckpointError(f"checkpoint body does not parse: {exc}") from None
        if canonical != body:
            raise CheckpointError("checkpoint body is not in canonical form (it was re-encoded or edited)")
        if (checkpoint.size < 0 or len(checkpoint.root) != _ROOT_BYTES or not math.isfinite(checkpoint.time)
                or (checkpoint.signs_every is not None and checkpoint.signs_every < 1)):
            raise CheckpointError(f"checkpoint has size {checkpoint.size}, a {len(checkpoint.root)}-byte root, "
                                  f"time {checkpoint.time} and signs every {checkpoint.signs_every} entries")
        return checkpoint


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint's exact signed body and its signature (what travels and what is stored)."""

    body: bytes
    signature: bytes

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint.parse(self.body)


class CheckpointSigner:
    """Signs checkpoints with a party's kit key; the key must be the one its certificate certifies.

    Made `from_kit`, it follows the kit: a renewed kit (new key and
    certificate in the same directory, `mor pki issue --renew`) is used from
    the first checkpoint signed a second or more after the renewal (the kit's
    files are looked at once a second at most), as the transport serves it
    from the next connection on (`refreshed`).
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate, *,
                 kit: CertKit | None = None) -> None:
        if key_id(private_key.public_key()) != key_id(certificate.public_key()):
            raise ValueError("the private key does not belong to the certificate (a kit mixed from two parties?)")
        self._key = private_key
        self.certificate = certificate
        self.party = identity_of(certificate).uri
        self.key = key_id(certificate.public_key())
        self._kit = kit
        self._kit_stamp = _stamp(kit)
        self._kit_checked_at = time.monotonic()
        self._unusable_stamp: tuple | None = None  # kit files last found mid-renewal (said once, not every second)

    @classmethod
    def from_kit(cls, kit: CertKit) -> CheckpointSigner:
        key = serialization.load_pem_private_key(kit.key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{kit.key_path}: checkpoints are signed with the kit's EC key; found "
                             f"{type(key).__name__}")
        return cls(key, kit.certificate(), kit=kit)

    def refreshed(self) -> CheckpointSigner:
        """This signer, or a new one if its kit's files changed (renewed); the party must stay the same."""
        now = time.monotonic()
        if self._kit is None or now - self._kit_checked_at < KIT_CHECK_SECONDS:
            return self
        self._kit_checked_at = now
        stamp = _stamp(self._kit)
        if stamp == self._kit_stamp:
            return self
        try:
            renewed = CheckpointSigner.from_kit(self._kit)
        except (ValueError, OSError) as exc:
            # A renewal between its new key and its new certificate (a pair that does not match), or killed
            # there: go on signing with the pair in hand, still valid and already in the log, as the transport
            # goes on serving it; the next check looks again.
            if stamp != self._unusable_stamp:
                self._unusable_stamp = stamp
                logger.warning("audit checkpoints of %s: the kit in %s does not load (%s), so they are still "
                               "signed with the certificate before it; finish or retry its renewal "
                               "(`mor pki issue --renew`)", self.party, self._kit.directory, exc)
            return self
        if renewed.party != self.party:
            raise ValueError(f"{self._kit.directory} now holds {renewed.party}'s kit, not {self.party}'s")
        return renewed

    def sign(self, *, size: int, root: bytes, time: float, signs_every: int) -> SignedCheckpoint:
        body = Checkpoint(log=self.party, size=size, root=root, time=time, key=self.key,
                          signs_every=signs_every).body()
        return SignedCheckpoint(body=body, signature=self._key.sign(body, ec.ECDSA(hashes.SHA256())))


def _stamp(kit: CertKit | None) -> tuple | None:
    if kit is None:
        return None
    stats = [path.stat() for path in (kit.cert_path, kit.key_path)]
    return tuple((stat.st_mtime_ns, stat.st_size) for stat in stats)


def verify_checkpoint(signed: SignedCheckpoint, certificates: Sequence[x509.Certificate]) -> Checkpoint:
    """The checkpoint, if one of `certificates` names its party, holds its key and verifies its signature."""
    checkpoint = signed.checkpoint
    by_key = {key_id(c.public_key()): c for c in certificates}
    certificate = by_key.get(checkpoint.key)
    if certificate is None:
        raise CheckpointError(f"checkpoint at size {checkpoint.size} is signed by key {checkpoint.key[:16]}..., "
                              "which none of the given certificates holds")
    party = identity_of(certificate).uri
    if party != checkpoint.log:
        raise CheckpointError(f"checkpoint claims to be {checkpoint.log}'s but is signed by {party}'s key")
    try:
        certificate.public_key().verify(signed.signature, signed.body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CheckpointError(f"checkpoint at size {checkpoint.size}: the signature does not verify "
                              "(forged, swapped or altered)") from None
    return checkpoint
