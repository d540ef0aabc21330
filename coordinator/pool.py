"""The silo pool: which silos the coordinator asks for scores, read from a YAML file.

This issue's pool is in-process: each entry names a silo's saved reward
model and the coordinator loads it behind an `InProcessSiloClient`, which is
how the simulations, the demo and the evaluation run on one machine. The
networked pool of a later issue replaces the entries' `reward_model` with an
address and a cert kit and builds network clients; router and GRPO code take
any `SiloClient` and do not change.

    silos:
      - name: hospital-a
        reward_model: silos/hospital-a/reward_model

No ledger here: a silo's answers to the coordinator are computed by its
DP-trained model on public inputs, post-processing that costs its data
budget nothing, randomized-response bits included (coordinator/silo_client.py).
The silo's ledger records its DP training; the coordinator never writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import Field, field_validator

from mor_secure.config import StrictModel, load_config, resolve_relative
from mor_secure.models.reward_model import load_reward_model

from .silo_client import InProcessSiloClient, SiloClient


class PoolSilo(StrictModel):
    """One silo of the pool."""

    name: str = Field(min_length=1, description="The silo's name, as in the consortium file and its certificate.")
    reward_model: Path = Field(description="Directory of the silo's saved reward model (in-process pool).")


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
    silos = [silo.model_copy(update={"reward_model": resolve_relative(path, silo.reward_model)})
             for silo in pool.silos]
    return pool.model_copy(update={"silos": silos})


def in_process_clients(pool: PoolConfig, *, names: Sequence[str] | None = None,
                       seed: int | None = None) -> list[InProcessSiloClient]:
    """Load the pool's reward models (all, or `names` in that order) behind in-process clients.

    Each client's randomized-response noise is drawn from OS entropy by
    default (`seed=None`), as a real silo's is. An explicit `seed` (client k
    gets seed + k) is for tests and simulations that need reproducible noise.
    """
    by_name = {s.name: s for s in pool.silos}
    wanted = list(pool.names if names is None else names)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown silo(s) {unknown}; the pool has {list(pool.names)}")
    clients = []
    for index, name in enumerate(wanted):
        silo = by_name[name]
        if not silo.reward_model.is_dir():
            raise FileNotFoundError(f"silo {name!r}: reward model directory {silo.reward_model} not found; "
                                    "train it first (`mor silo train --config <silo>.yaml`)")
        client_seed = None if seed is None else seed + index
        clients.append(InProcessSiloClient(name, load_reward_model(silo.reward_model), seed=client_seed))
    return clients


def client_for_model(name: str, reward_model: str | Path) -> SiloClient:
    """A client over one saved reward model outside the pool (the FedAvg and centralised baselines)."""
    reward_model = Path(reward_model)
    if not reward_model.is_dir():
        raise FileNotFoundError(f"{name}: reward model directory {reward_model} not found")
    return InProcessSiloClient(name, load_reward_model(reward_model))
