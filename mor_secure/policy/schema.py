"""The silo's serving policy as a strict schema (pydantic, `extra="forbid"`), loaded from YAML.

A hospital's operator writes it (policies/*.yaml are examples, each validated
by a test); `mor silo serve` enforces it on every call through
`policy.engine.SiloAdmission` (who, how often, how many at once) and the
silo's request checks (how big). Secure defaults: only the coordinator may
ask for scores and bits, an auditor may only read the description.

`RequestLimits` bounds every request before any model code runs: a request
over a limit is refused with INVALID_ARGUMENT. The serialised size and the
counts are checked before the request is converted, its texts and image
references next, and its images are decoded last, each checked from its
header first (so a bad prompt costs the silo no decoding). The defaults
fit a GRPO step of the shipped consortium with room to spare (8 generations
x 16 prompts = 128 rows, one 64x64 PNG per prompt, ~2 KB each) and stop a
caller from making the silo decode a decompression bomb, hold more decoded
pixels per request than `max_request_pixels`, or hold megabytes of text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import Field, field_validator

from mor_secure.config import StrictModel, load_config
from mor_secure.pki.identity import PartyIdentity, Role, parse_identity
from mor_secure.wire.messages import OBJECTIVES

RPCS = ("Describe", "Score", "CorrectnessBits", "AgreementKey", "SecureScore", "Decrypt")


class RequestLimits(StrictModel):
    """Per-request size limits; every RPC's input is checked against them before it reaches the model."""

    max_items: int = Field(1024, gt=0, le=65536,
                           description="Most rows (Score) or pairs (CorrectnessBits) in one request.")
    max_images: int = Field(512, gt=0, le=65536, description="Most distinct images in one request.")
    max_image_bytes: int = Field(1 << 20, gt=0, le=16 << 20,
                                 description="Largest encoded image accepted, in bytes (1 MiB by default).")
    max_image_pixels: int = Field(1 << 20, gt=0, le=1 << 28,
                                  description="Largest decoded image accepted, width x height (1 megapixel by "
                                  "default), checked from the header before any pixel is decoded.")
    # 16 images at the per-image maximum, 8x the demo's largest request (512 images of 64x64 = 2 Mpx): 48 MiB of
    # RGB per request, so the 4 requests served at once by default hold under 200 MiB of decoded pixels.
    max_request_pixels: int = Field(1 << 24, gt=0, le=1 << 30,
                                    description="Most decoded pixels (width x height, summed over its images) in one "
                                    "request (16 megapixels by default), checked from the headers before decoding.")
    max_text_chars: int = Field(2048, gt=0, le=1 << 16,
                                description="Longest prompt or response accepted, in characters.")
    max_request_bytes: int = Field(8 << 20, gt=0, le=30 << 20,
                                   description="Largest serialised request accepted over the network, in bytes "
                                   "(the transport itself refuses anything above 32 MiB).")


class RateLimit(StrictModel):
    """A token bucket per caller: `per_second` sustained, bursts up to `burst` requests."""

    per_second: float = Field(20.0, gt=0, description="Sustained requests per second allowed per caller.")
    burst: int = Field(40, gt=0, description="Requests a caller may make at once after being idle.")


def default_allowed_callers(*, coordinator: str = "coordinator",
                            auditors: Sequence[str] = ("auditor",)) -> dict[str, list[str]]:
    """The secure default: only the coordinator may call anything; the auditors may also read the description.

    The names are the consortium file's (`coordinator:`, `auditors:`), whose
    defaults these are; a silo serving without a policy file uses its
    consortium's (`silo_agent.serving`).
    """
    coordinator_uri = PartyIdentity(Role.COORDINATOR, coordinator).uri
    return {"Describe": [coordinator_uri, *(PartyIdentity(Role.AUDITOR, a).uri for a in auditors)],
            **{rpc: [coordinator_uri] for rpc in RPCS if rpc != "Describe"}}


class SiloPolicy(StrictModel):
    """`policies/<silo>.yaml`: who may ask this silo what, how often, and how much at once."""

    allowed_callers: dict[str, list[str]] = Field(
        default_factory=default_allowed_callers,
        description="Per RPC, the SAN URIs of the parties allowed to call it (on top of the roles the RPC "
        "admits at all). An RPC left out is refused to everyone. Default: the consortium's coordinator for "
        "every RPC and its auditors for Describe (`mor silo serve` reads their names from the consortium file; "
        "mor://coordinator/coordinator and mor://auditor/auditor without one).")
    rate_limit: RateLimit = Field(default_factory=RateLimit, description="Requests per caller over time.")
    daily_cap: int = Field(200_000, gt=0,
                           description="Most requests per caller per UTC day (a 300-step GRPO run makes ~600).")
    # Each request served holds one of the server's worker threads; 64 bounds the threads a policy can ask for.
    max_concurrent_requests: int = Field(4, gt=0, le=64, description="Requests served at once; more are refused "
                                         "(RESOURCE_EXHAUSTED) rather than queued. `mor silo serve` runs this many "
                                         "worker threads plus the open streams' and two spare, so a health check "
                                         "is always answered.")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Per-request size limits.")
    allowed_objectives: list[str] = Field(
        default_factory=lambda: list(OBJECTIVES),
        description="What this silo's model may be used for; a request names its objective and any other is "
        f"refused (PERMISSION_DENIED). Known objectives: {', '.join(OBJECTIVES)}.")

    max_weight: float = Field(
        1.0, gt=0, le=1.0, description="Largest router weight a request may give this silo's score on one row; "
        "more is refused (PERMISSION_DENIED). Router weights are a convex mixture, so 1 caps nothing; a silo that "
        "will not be the sole judge of any answer sets less (the coordinator must then cap its router). A Score "
        "request without weights gives the score weight 1 on every row, so under less than 1 it is refused too.")

    minimum_participants: int = Field(
        2, ge=2, description="Fewest silos in a secure-aggregation round this silo answers or decrypts "
        "(FAILED_PRECONDITION otherwise): with one, the sum is that silo's own terms.")

    @field_validator("allowed_objectives")
    @classmethod
    def _known_objectives(cls, objectives: list[str]) -> list[str]:
        unknown = sorted(set(objectives) - set(OBJECTIVES))
        if unknown:
            raise ValueError(f"unknown objective(s) {unknown}; known: {list(OBJECTIVES)}")
        return objectives

    @field_validator("allowed_callers")
    @classmethod
    def _known_rpcs_and_identities(cls, allowed: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted(set(allowed) - set(RPCS))
        if unknown:
            raise ValueError(f"unknown RPC(s) {unknown}; the silo serves {list(RPCS)}")
        for rpc, callers in allowed.items():
            for caller in callers:
                parse_identity(caller)  # ValueError names the bad URI
        return allowed


def load_policy(path: str | Path) -> SiloPolicy:
    """Read a policy YAML (ConfigError naming the file and field on any problem)."""
    return load_config(path, SiloPolicy)
