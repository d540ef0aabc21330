"""The in-process `SiloClient`: the silo's service object called directly, for simulations on one machine.

It adds nothing to `SiloService`: the same validation, limits, scoring and
randomized response run as behind the gRPC servicer, which is why one shared
test suite runs against both (tests/contract/). What it cannot give is
separation: the silo's model lives in the coordinator's process. It is for
tests, benchmarks, `make results-table` and simulations; a consortium runs
silos as `mor silo serve` and reaches them over mutual TLS.
"""

from __future__ import annotations

from pathlib import Path

from mor_secure.models.reward_model import LocalResources
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

from .secure_rounds import SecureRounds, no_secure_rounds
from .service import SiloService, open_model_service


class InProcessSiloClient:
    """A `SiloClient` over a `SiloService` living in this process."""

    def __init__(self, service: SiloService, *, secure: SecureRounds | None = None) -> None:
        if not isinstance(service, SiloService):
            raise ValueError(f"service must be a SiloService, got {type(service).__name__}")
        self.service = service
        self.secure = secure

    @property
    def name(self) -> str:
        return self.service.name

    def describe(self) -> SiloDescription:
        return self.service.describe()

    def score(self, request: ScoreRequest) -> ScoreReply:
        return self.service.score(request)

    def correctness_bits(self, request: BitsRequest) -> BitsReply:
        return self.service.correctness_bits(request)

    def _rounds(self) -> SecureRounds:
        return no_secure_rounds(self.name) if self.secure is None else self.secure

    def agreement_key(self) -> AgreementKeyReply:
        return self._rounds().agreement_key()

    def secure_score(self, request: SecureScoreRequest) -> SecureScoreReply:
        return self._rounds().secure_score(request)

    def decrypt(self, request: DecryptRequest) -> DecryptReply:
        return self._rounds().decrypt(request)


def in_process_client(name: str, model_dir: str | Path, *, base_model: str | Path | None = None,
                      feature_cache: str | Path | None = None,
                      randomized_response_seed: int | None = None) -> InProcessSiloClient:
    """An in-process client over a saved reward model (what an in-process pool entry opens)."""
    resources = LocalResources(base_model=None if base_model is None else Path(base_model),
                               feature_cache=None if feature_cache is None else Path(feature_cache))
    return InProcessSiloClient(open_model_service(name, model_dir, resources=resources,
                                                  randomized_response_seed=randomized_response_seed))
