"""Building silo requests from the coordinator's own public files, and reading the replies.

The coordinator holds its public data (calibration and GRPO images) as files;
a silo takes images only as bytes with their SHA-256 (mor_secure.wire). Each
file is read and hashed once per process while unchanged, each distinct image
goes once into a request, and a reply is checked (one finite score or bit per
row) before anything uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from mor_secure.data.records import PreferencePair
from mor_secure.wire.client import SiloClient
from mor_secure.wire.errors import ErrorCode, SiloError
from mor_secure.wire.messages import (
    BitsPair,
    BitsRequest,
    ImageBlob,
    ScoreReply,
    ScoreRequest,
    ScoreRow,
    image_table,
)

# Rows (or pairs) per request: half the default silo limits (1024 items, 512 images; mor_secure.policy),
# and ~1 MB of easy-VQA PNGs, under gRPC's 4 MB default message size. A GRPO step (<= 128 rows) is one request;
# calibration (~1,200 pairs per objective) is a few.
ROWS_PER_REQUEST = 512

# The coordinator's public images: 5,000 easy-VQA PNGs of ~2 KB each fit many times over.
_BLOB_CACHE_SIZE = 16384


@lru_cache(maxsize=_BLOB_CACHE_SIZE)
def _file_blob(path: str, mtime_ns: int, size: int) -> ImageBlob:
    return ImageBlob.of(Path(path).read_bytes())


def image_blob(path: str | Path) -> ImageBlob:
    """The bytes and SHA-256 of an image file (cached while the file is unchanged)."""
    stat = Path(path).stat()
    return _file_blob(str(path), stat.st_mtime_ns, stat.st_size)


def score_request(images: Sequence[str | Path], prompts: Sequence[str], responses: Sequence[str], *,
                  objective: str, round_id: str = "") -> ScoreRequest:
    """One request for every row; each distinct image travels once."""
    if not (len(images) == len(prompts) == len(responses)):
        raise ValueError(f"images, prompts and responses must have one entry per row, got lengths "
                         f"{len(images)}, {len(prompts)}, {len(responses)}")
    blobs, index = image_table([image_blob(p) for p in images])
    rows = tuple(ScoreRow(image=i, prompt=p, response=r) for i, p, r in zip(index, prompts, responses, strict=True))
    return ScoreRequest(images=blobs, rows=rows, round_id=round_id, objective=objective)


def bits_request(pairs: Sequence[PreferencePair], *, objective: str,
                 randomized_response_epsilon: float | None = None, round_id: str = "") -> BitsRequest:
    """One correctness-bits request for public `pairs`; each distinct image travels once."""
    blobs, index = image_table([image_blob(p.image_path) for p in pairs])
    wire_pairs = tuple(BitsPair(image=i, prompt=p.prompt, chosen=p.chosen, rejected=p.rejected)
                       for i, p in zip(index, pairs, strict=True))
    return BitsRequest(images=blobs, pairs=wire_pairs, randomized_response_epsilon=randomized_response_epsilon,
                       round_id=round_id, objective=objective)


def reply_scores(reply: ScoreReply, rows: int, silo: str) -> torch.Tensor:
    """[rows] float tensor of a silo's scores; INTERNAL (the silo's fault) unless there is one finite score per row."""
    scores = getattr(reply, "scores", None)
    if not isinstance(scores, (tuple, list)) or len(scores) != rows:
        found = len(scores) if isinstance(scores, (tuple, list)) else type(reply).__name__
        raise SiloError(ErrorCode.INTERNAL, f"silo {silo!r} returned {found} scores for {rows} rows")
    if not all(isinstance(s, float) and math.isfinite(s) for s in scores):
        raise SiloError(ErrorCode.INTERNAL, f"silo {silo!r} returned non-finite scores")
    return torch.tensor(scores, dtype=torch.float32)


def score_requests(images: Sequence[str | Path], prompts: Sequence[str], responses: Sequence[str], *,
                   objective: str, round_id: str = "") -> list[ScoreRequest]:
    """The rows as few requests as the row limit allows (built once, sent to every silo of a round)."""
    return [score_request(images[start:start + ROWS_PER_REQUEST], prompts[start:start + ROWS_PER_REQUEST],
                          responses[start:start + ROWS_PER_REQUEST], objective=objective, round_id=round_id)
            for start in range(0, len(responses), ROWS_PER_REQUEST)]


def send_scores(client: SiloClient, requests: Sequence[ScoreRequest]) -> torch.Tensor:
    """[N] standardised scores of `client` for every row of `requests`, in order."""
    parts = [reply_scores(client.score(request), len(request.rows), client.name) for request in requests]
    return torch.cat(parts) if parts else torch.zeros(0)


def ask_scores(client: SiloClient, images: Sequence[str | Path], prompts: Sequence[str],
               responses: Sequence[str], *, objective: str, round_id: str = "") -> torch.Tensor:
    """[N] standardised scores of `client` for the rows, in as few requests as the row limit allows."""
    return send_scores(client, score_requests(images, prompts, responses, objective=objective, round_id=round_id))


def bits_requests(pairs: Sequence[PreferencePair], *, objective: str,
                  randomized_response_epsilon: float | None = None, round_id: str = "") -> list[BitsRequest]:
    """The pairs as few correctness-bits requests as the row limit allows."""
    pairs = list(pairs)
    return [bits_request(pairs[start:start + ROWS_PER_REQUEST], objective=objective, round_id=round_id,
                         randomized_response_epsilon=randomized_response_epsilon)
            for start in range(0, len(pairs), ROWS_PER_REQUEST)]


def ask_bits(client: SiloClient, pairs: Sequence[PreferencePair], *, objective: str,
             randomized_response_epsilon: float | None = None, round_id: str = "") -> torch.Tensor:
    """[N] bool tensor: the silo's (possibly randomized) correctness bit per public pair."""
    return send_bits(client, bits_requests(pairs, objective=objective, round_id=round_id,
                                           randomized_response_epsilon=randomized_response_epsilon))


def send_bits(client: SiloClient, requests: Sequence[BitsRequest]) -> torch.Tensor:
    """[N] bool tensor of `client`'s bits for every pair of `requests`, in order."""
    parts = []
    for request in requests:
        reply = client.correctness_bits(request)
        if len(reply.bits) != len(request.pairs):
            raise RuntimeError(f"silo {client.name!r} returned {len(reply.bits)} bits for {len(request.pairs)} pairs")
        parts.append(torch.tensor(reply.bits, dtype=torch.bool))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
