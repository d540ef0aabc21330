"""Plain message types between the coordinator and a silo (no torch tensors, no filesystem paths).

Images travel as bytes with their SHA-256, each distinct image ONCE per
request, and rows refer to them by index: a GRPO step asks about one image
with many completions, and the bytes are most of a request's size. The silo
checks every digest, so the digest is also the content key of its caches.

These types are what `SiloClient` takes and returns, so the router, GRPO and
evaluation never assume a shared filesystem; `serde` converts them to and
from protobuf, and nothing else does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from mor_secure.privacy.reports import PrivacyReport


# The reward objectives a request may serve (the router's objectives, coordinator/calibration.py). The caller
# names one; the silo's policy (`allowed_objectives`) decides whether its model may judge for it, and both
# parties' audit logs record it: purpose limitation (GDPR Art. 5(1)(b)) for a model trained on patients' data.
OBJECTIVES = {
    "correct": "is the answer right",
    "correct_and_brief": "is the answer right and given without padding",
}


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256 of `data`: the content key of an image."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ImageBlob:
    """One encoded image (PNG, JPEG, ...) and the SHA-256 of exactly these bytes."""

    sha256: str
    data: bytes

    @classmethod
    def of(cls, data: bytes) -> ImageBlob:
        """A blob whose digest is computed here (the sender's side)."""
        return cls(sha256=sha256_hex(data), data=bytes(data))

    def sha256_bytes(self) -> bytes:
        """The digest as 32 raw bytes (its wire form)."""
        return bytes.fromhex(self.sha256)


@dataclass(frozen=True)
class ScoreRow:
    """One (image, prompt, response) to score; `image` indexes the request's `images`."""

    image: int
    prompt: str
    response: str


@dataclass(frozen=True)
class ScoreRequest:
    """A batch to score: every completion of a step in one call (silos' rate caps count calls).

    `weights` (empty: none) is this silo's own router weight per row; the
    silo then answers weight * score per row, so a fusion learns only the
    weighted terms it sums.
    """

    images: tuple[ImageBlob, ...]
    rows: tuple[ScoreRow, ...]
    round_id: str = ""
    objective: str = ""
    weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class ScoreReply:
    """Standardised scores (mean 0, std 1 on public calibration pairs), one per request row (pre-weighted if asked)."""

    scores: tuple[float, ...]


@dataclass(frozen=True)
class BitsPair:
    """One public calibration pair; `image` indexes the request's `images`."""

    image: int
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class BitsRequest:
    """"Which of these public pairs does your model rank right?", optionally through randomized response."""

    images: tuple[ImageBlob, ...]
    pairs: tuple[BitsPair, ...]
    randomized_response_epsilon: float | None = None
    round_id: str = ""
    objective: str = ""


@dataclass(frozen=True)
class BitsReply:
    """One bit per pair (chosen scored strictly above rejected), and the flip probability used (None: exact)."""

    bits: tuple[bool, ...]
    flip_probability: float | None = None


@dataclass(frozen=True)
class LedgerSummary:
    """The public state of a silo's privacy ledger: budgets, spends, and the head of its hash chain."""

    epsilon_budget: float
    delta_budget: float
    epsilon_spent: float
    delta_spent: float
    charges: int
    open_reservations: int
    head_digest: str


@dataclass(frozen=True)
class SiloDescription:
    """What a silo says about itself: enough to label results and check its guarantee, nothing about its data."""

    name: str
    architecture: str
    trainable_params: int
    privacy_report: PrivacyReport | None = None
    ledger: LedgerSummary | None = None


def image_table(blobs: Sequence[ImageBlob]) -> tuple[tuple[ImageBlob, ...], list[int]]:
    """The distinct images of `blobs` (first-seen order) and, per blob, the index of its distinct copy."""
    index_of: dict[str, int] = {}
    distinct: list[ImageBlob] = []
    indices = []
    for blob in blobs:
        if blob.sha256 not in index_of:
            index_of[blob.sha256] = len(distinct)
            distinct.append(blob)
        indices.append(index_of[blob.sha256])
    return tuple(distinct), indices


@dataclass(frozen=True)
class Participant:
    """One silo of a secure round: its name, its signed key-agreement key, and the certificate that signed it."""

    name: str
    agreement_key: str  # SignedAgreementKey JSON (mor_secure.secagg.agreement)
    certificate_pem: bytes


@dataclass(frozen=True)
class AgreementKeyReply:
    """A silo's signed X25519 public key and its certificate, for the coordinator to relay to the other silos."""

    agreement_key: str
    certificate_pem: bytes


@dataclass(frozen=True)
class SecureScoreRequest:
    """A weighted scoring request of one secure round, with the round's participants (the asked silo among them)."""

    score: ScoreRequest
    participants: tuple[Participant, ...]


@dataclass(frozen=True)
class SecureScoreReply:
    """The silo's masked, encrypted weighted terms: one BFV ciphertext per request (serialised)."""

    ciphertexts: tuple[bytes, ...]


@dataclass(frozen=True)
class DecryptRequest:
    """Decrypt the blinded sum of round `round_id` over `participants` (one ciphertext per request of the round)."""

    round_id: str
    participants: tuple[str, ...]
    ciphertexts: tuple[bytes, ...]


@dataclass(frozen=True)
class DecryptReply:
    """The plaintext integers mod t, one tuple per ciphertext."""

    values: tuple[tuple[int, ...], ...]
