"""`SiloClient`: the coordinator's view of one silo, in wire types only.

Two implementations answer it with the same code on the silo's side: the
in-process adapter (`silo_agent.in_process`) calls the silo's service object
directly, and the networked client (`coordinator.network_client`) reaches the
same service object through its gRPC servicer over mutual TLS. Router, GRPO
and evaluation code take any `SiloClient`; one shared test suite runs against
both (tests/contract/).

Refusals come back as `mor_secure.wire.SiloError` with the status code the
silo chose, whichever the transport.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .messages import (
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


@runtime_checkable
class SiloClient(Protocol):
    """One silo, as the coordinator sees it."""

    @property
    def name(self) -> str:
        """The silo's name (as in the consortium file and its certificate)."""
        ...

    def describe(self) -> SiloDescription:
        """Architecture, public privacy report and ledger summary; nothing about the silo's data."""
        ...

    def score(self, request: ScoreRequest) -> ScoreReply:
        """Standardised scores, one per row of `request`."""
        ...

    def correctness_bits(self, request: BitsRequest) -> BitsReply:
        """One bit per public pair: did the silo's model score `chosen` strictly above `rejected`?"""
        ...


@runtime_checkable
class SecureSiloClient(SiloClient, Protocol):
    """A silo that also takes part in secure aggregation (mor_secure.secagg; silo_agent/secure_rounds.py)."""

    def agreement_key(self) -> AgreementKeyReply:
        """The silo's signed X25519 key and its certificate."""
        ...

    def secure_score(self, request: SecureScoreRequest) -> SecureScoreReply:
        """The silo's masked, encrypted weighted terms for one round."""
        ...

    def decrypt(self, request: DecryptRequest) -> DecryptReply:
        """A round's blinded sum decrypted (once per round, by one of its participants)."""
        ...
