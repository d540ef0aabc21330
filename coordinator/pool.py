"""The silo pool: which silos the coordinator asks for scores, read from a YAML file.

An in-process entry names a silo's saved reward model; the silo's own service
object (silo_agent) is then run inside the coordinator's process behind an
in-process client, which is how tests, benchmarks and `make results-table`
run on one machine. Router, GRPO and evaluation code take any `SiloClient`.

    silos:
      - name: hospital-a
        reward_model: silos/hospital-a/reward_model
      - name: bank-b
        reward_model: silos/bank-b/reward_model
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

from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import Field, field_validator

from mor_secure.config import StrictModel, load_config, resolve_relative
from mor_secure.wire.client import SiloClient

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
    """One silo of the pool."""

    name: str = Field(min_length=1, description="The silo's name, as in the consortium file and its certificate.")
    reward_model: Path = Field(description="Directory of the silo's saved reward model (in-process pool).")
    base_model: Path | None = Field(
        None, description="lora_vlm silos: the shared VLM checkpoint the reward model was trained on.")
    feature_cache: Path | None = Field(None, description="frozen_encoders silos: directory of cached image features.")


class PoolConfig(StrictModel):
    """`--pool pool.yaml`: the silos whose reward models the coordinator mixes. Paths relative to the file."""

    silos: list[PoolSilo] = Field(min_length=1, description="The silos, in the order the router's columns use.")

    @field_validator("silos")
    @classmethod
    def _unique_names(cls, silos: list[PoolSilo]) -> list[PoolSilo]:
        names = [s.name for s in silos]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"silo names must be unique; repeated: {repeated}")
        return silos

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.silos)


def load_pool(path: str | Path) -> PoolConfig:
    """Read a pool YAML, resolving every path against the file's directory."""
    pool = load_config(path, PoolConfig)
    silos = []
    for silo in pool.silos:
        updates = {field: resolve_relative(path, getattr(silo, field))
                   for field in ("reward_model", "base_model", "feature_cache") if getattr(silo, field) is not None}
        silos.append(silo.model_copy(update=updates))
    return pool.model_copy(update={"silos": silos})


def in_process_clients(pool: PoolConfig, *, names: Sequence[str] | None = None,
                       seed: int | None = None) -> list[SiloClient]:
    """Open the pool's silos (all, or `names` in that order) in this process.

    Each silo's randomized-response noise is drawn from OS entropy by default
    (`seed=None`), as a real silo's is. An explicit `seed` (silo k gets
    seed + k) is for tests and simulations that need reproducible noise.
    """
    by_name = {s.name: s for s in pool.silos}
    wanted = list(pool.names if names is None else names)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown silo(s) {unknown}; the pool has {list(pool.names)}")
    opener = _opener()
    return [opener(name, by_name[name].reward_model, base_model=by_name[name].base_model,
                   feature_cache=by_name[name].feature_cache,
                   randomized_response_seed=None if seed is None else seed + index)
            for index, name in enumerate(wanted)]


def client_for_model(name: str, reward_model: str | Path, *, base_model: str | Path | None = None,
                     feature_cache: str | Path | None = None) -> SiloClient:
    """A client over one saved reward model outside the pool (the FedAvg and centralised baselines)."""
    return _opener()(name, Path(reward_model), base_model=base_model, feature_cache=feature_cache,
                     randomized_response_seed=None)
