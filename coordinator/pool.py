"""The silo pool: which silos the coordinator asks for scores, read from a YAML file.

A networked entry names the address of a silo's `mor silo serve`; the
coordinator reaches it over mutual TLS with its own kit (`kit:`). An
in-process entry names a silo's saved reward model; the silo's own service
object (silo_agent) then runs inside the coordinator's process behind an
in-process client, which is how tests, benchmarks and `make results-table`
run on one machine. Router, GRPO and evaluation code take any `SiloClient`.

    kit: pki/kits/coordinator-coordinator     # networked pools: the coordinator's certificate kit
    audit_log: audit/coordinator.db           # default: coordinator-audit.db beside this file
    decrypted_rows: audit/decrypted-rows.db   # default: decrypted-rows.db beside this file (secure pools)
    minimum_participants: 2                   # a scoring round goes on without a silo that is down
    deadline_seconds: 60
    silos:
      - name: hospital-a
        address: 127.0.0.1:50051
      - name: bank-b
        reward_model: silos/bank-b/reward_model   # in-process (simulation)
        base_model: vlm/reference     # lora_vlm: the shared VLM it was trained on (checked by digest)

The coordinator never imports the silo agent (DESIGN §3: the roles meet only
through the wire contract). Whoever composes both roles in one process (the
`mor` entry point, the demo, the tests) hands this module the silo agent's
in-process opener with `use_in_process_silos`.

No ledger here: a silo's answers to the coordinator are computed by its
DP-trained model on public inputs, post-processing that costs its data
budget nothing, randomized-response bits included (silo_agent/service.py).
The silo's ledger records its DP training; the coordinator never writes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mor_secure.audit import AuditLog
from mor_secure.config import StrictModel, load_config, resolve_relative
from mor_secure.pki.kits import CertKit
from mor_secure.secagg.provisioning import coordinator_context, has_coordinator_material
from mor_secure.wire.client import SiloClient

from .audit_trail import coordinator_log
from .decrypted_rows import DecryptedRows
from .fusion import ClearFusion
from .secure_fusion import SecureFusion

logger = logging.getLogger(__name__)
# (name, reward-model directory, *, base_model, feature_cache, randomized_response_seed) -> client
InProcessOpener = Callable[..., SiloClient]
_in_process_opener: InProcessOpener | None = None


def use_in_process_silos(opener: InProcessOpener) -> None:
    """Let in-process pool entries open silos with `opener` (silo_agent.in_process.in_process_client)."""
    global _in_process_opener
    _in_process_opener = opener


def _opener() -> InProcessOpener:
    if _in_process_opener is None:
        raise RuntimeError("in-process silo pools need the silo agent in this process: run through `mor` (which "
                           "composes both roles) or call coordinator.pool.use_in_process_silos("
                           "silo_agent.in_process.in_process_client) first")
    return _in_process_opener


class PoolSilo(StrictModel):
    """One silo of the pool: networked (`address`) or in-process (`reward_model`)."""

    name: str = Field(min_length=1, description="The silo's name, as in the consortium file and its certificate.")
    address: str | None = Field(None, description="host:port of the silo's `mor silo serve` (networked pool).")
    reward_model: Path | None = Field(None, description="Directory of the silo's saved reward model (in-process).")
    base_model: Path | None = Field(
        None, description="In-process lora_vlm silos: the shared VLM checkpoint the reward model was trained on.")
    feature_cache: Path | None = Field(None, description="In-process frozen_encoders silos: cached image features.")

    @model_validator(mode="after")
    def _one_way_to_reach_it(self) -> PoolSilo:
        if (self.address is None) == (self.reward_model is None):
            raise ValueError(f"silo {self.name!r}: give exactly one of address (networked) or reward_model "
                             "(in-process)")
        if self.address is not None and (self.base_model or self.feature_cache):
            raise ValueError(f"silo {self.name!r}: base_model and feature_cache are the silo's own settings; a "
                             "networked silo sets them in its silo YAML")
        return self


class PoolConfig(StrictModel):
    """`--pool pool.yaml`: the silos whose reward models the coordinator mixes. Paths relative to the file."""

    silos: list[PoolSilo] = Field(min_length=1, description="The silos, in the order the router's columns use.")
    kit: Path | None = Field(None, description="The coordinator's certificate kit; required for networked silos.")
    minimum_participants: int | None = Field(
        None, ge=1, description="Silos that must answer a scoring round; fewer fails it. Default: all of them.")
    deadline_seconds: float = Field(60.0, gt=0, description="Deadline of one call to a networked silo.")
    retries: int = Field(3, ge=0, le=10, description="Retries (with backoff) of a call that found a silo UNAVAILABLE.")
    aggregation: Literal["secure", "clear"] = Field(
        "secure", description="Networked pools: `secure` (the coordinator learns only the sum over silos; needs "
        "the secure-aggregation material `mor pki init` puts in the kits) or `clear` (each silo's weighted scores "
        "reach the coordinator: for benchmarks and comparisons only). In-process pools always fuse in the clear.")
    audit_log: Path | None = Field(
        None, description="Networked pools: the coordinator's tamper-evident audit log of every call and round "
        "(SQLite; default: coordinator-audit.db beside the pool file). `mor audit verify` checks it.")
    decrypted_rows: Path | None = Field(
        None, description="Networked secure pools: the coordinator's record of each row it has decrypted a sum of, "
        "under which weights (SQLite; default: decrypted-rows.db beside the pool file), so that no later sum, in "
        "this run or another, determines a silo's score on a row (coordinator/decrypted_rows.py). Keep it as long "
        "as the silos serve the same models.")

    @field_validator("silos")
    @classmethod
    def _unique_names(cls, silos: list[PoolSilo]) -> list[PoolSilo]:
        names = [s.name for s in silos]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"silo names must be unique; repeated: {repeated}")
        return silos

    @model_validator(mode="after")
    def _networked_needs_a_kit(self) -> PoolConfig:
        if self.networked and self.kit is None:
            raise ValueError("networked silos need the coordinator's certificate kit: set kit: <kit directory>")
        if self.aggregation == "secure" and self.networked and (
                len(self.silos) < 2 or (self.minimum_participants or len(self.silos)) < 2):
            raise ValueError("secure aggregation needs at least 2 participants in every round (the sum of one "
                             "silo is its own scores): raise minimum_participants, or set aggregation: clear")
        if self.minimum_participants is not None and self.minimum_participants > len(self.silos):
            raise ValueError(f"minimum_participants {self.minimum_participants} exceeds the {len(self.silos)} silos")
        return self

    @property
    def networked(self) -> bool:
        """Whether any silo is reached over the network (then the kit, the audit log and secure rounds apply)."""
        return any(s.address for s in self.silos)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.silos)


def load_pool(path: str | Path) -> PoolConfig:
    """Read a pool YAML, resolving every path against the file's directory."""
    pool = load_config(path, PoolConfig)
    if pool.kit is not None:
        pool = pool.model_copy(update={"kit": resolve_relative(path, pool.kit)})
    if pool.networked:
        pool = pool.model_copy(update={
            "audit_log": resolve_relative(path, pool.audit_log or Path("coordinator-audit.db")),
            "decrypted_rows": resolve_relative(path, pool.decrypted_rows or Path("decrypted-rows.db"))})
    silos = []
    for silo in pool.silos:
        updates = {field: resolve_relative(path, getattr(silo, field))
                   for field in ("reward_model", "base_model", "feature_cache") if getattr(silo, field) is not None}
        silos.append(silo.model_copy(update=updates))
    return pool.model_copy(update={"silos": silos})


def pool_clients(pool: PoolConfig, *, names: Sequence[str] | None = None,
                 seed: int | None = None) -> list[SiloClient]:
    """A client per silo of the pool (all, or `names` in that order): networked or in-process per entry.

    In-process silos' randomized-response noise is drawn from OS entropy by
    default (`seed=None`), as a real silo's is. An explicit `seed` (silo k
    gets seed + k) is for tests and simulations that need reproducible noise;
    a networked silo's noise is its own business and never seeded from here.
    """
    from .network_client import NetworkSiloClient

    by_name = {s.name: s for s in pool.silos}
    wanted = list(pool.names if names is None else names)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown silo(s) {unknown}; the pool has {list(pool.names)}")
    kit = CertKit.load(pool.kit) if pool.kit is not None else None
    audit = pool_audit_log(pool)
    clients: list[SiloClient] = []
    for index, name in enumerate(wanted):
        silo = by_name[name]
        if silo.address is not None:
            clients.append(NetworkSiloClient(name, silo.address, kit, deadline_s=pool.deadline_seconds,
                                             retries=pool.retries, audit=audit))
        else:
            clients.append(_opener()(name, silo.reward_model, base_model=silo.base_model,
                                     feature_cache=silo.feature_cache,
                                     randomized_response_seed=None if seed is None else seed + index))
    return clients


def pool_audit_log(pool: PoolConfig) -> AuditLog | None:
    """The coordinator's audit log for a networked pool (None for an in-process one: no calls to record)."""
    if pool.audit_log is None or not pool.networked:
        return None
    return coordinator_log(pool.audit_log, CertKit.load(pool.kit))


def pool_fusion(pool: PoolConfig) -> Callable[..., ClearFusion]:
    """How rewards fuse over this pool's silos: the pool's minimum participants, scaled to a subset.

    A networked pool aggregates securely unless it says `aggregation: clear`
    (a single-silo baseline has nothing to hide its scores among, so it is
    clear, and says so); rounds over a networked pool are entries in the
    coordinator's audit log.
    """
    if pool.networked and pool.aggregation == "clear":
        logger.warning("this pool fuses in the clear (aggregation: clear): every silo's weighted scores reach the "
                       "coordinator; for benchmarks and comparisons only, never with patients' data (set "
                       "aggregation: secure, the default)")
    context = None  # the public BFV context, read once for every fusion this pool builds
    decrypted = None  # the pool's one record of decrypted rows, shared by every fusion it builds

    def fusion(clients: Sequence[SiloClient], *, objective: str = "correct", method: str = "") -> ClearFusion:
        nonlocal context, decrypted
        minimum = None
        if pool.minimum_participants is not None:
            # The minimum is for the whole pool; a single-silo baseline needs its one silo.
            minimum = max(1, len(clients) - (len(pool.silos) - pool.minimum_participants))
        settings = dict(objective=objective, minimum_participants=minimum, audit=pool_audit_log(pool), method=method)
        if secure_aggregation(pool) and len(clients) > 1:
            if context is None:
                kit = CertKit.load(pool.kit)
                if not has_coordinator_material(kit):
                    raise ValueError(f"{kit.directory} holds no public secure-aggregation context (he_public.ctx): "
                                     "provision the consortium with `mor pki init`, or set aggregation: clear")
                context = coordinator_context(kit)
            if decrypted is None:
                decrypted = DecryptedRows(pool.names, pool.decrypted_rows)
            return SecureFusion(clients, context, decrypted=decrypted, **settings)
        if secure_aggregation(pool):
            logger.warning("%s asks one silo alone: its round is clear (a sum over one silo is its own scores)",
                           method or "this reward")
        return ClearFusion(clients, **settings)
    return fusion


def secure_aggregation(pool: PoolConfig) -> bool:
    """Whether this pool's rounds are aggregated securely (networked, `aggregation: secure`)."""
    return pool.aggregation == "secure" and pool.networked


def client_for_model(name: str, reward_model: str | Path, *, base_model: str | Path | None = None,
                     feature_cache: str | Path | None = None) -> SiloClient:
    """A client over one saved reward model outside the pool (the FedAvg and centralised baselines)."""
    return _opener()(name, Path(reward_model), base_model=base_model, feature_cache=feature_cache,
                     randomized_response_seed=None)
