"""Fusion: from router weights w [N, K] and the items to score, the fused reward R = sum_k w_k r_k [N].

GRPO's reward code calls a `Fusion` and nothing else about the silos, so how
the sum is formed can change without touching it. `ClearFusion` asks every
silo for its scores and adds them on the coordinator: the coordinator then
sees each silo's scores, which is acceptable for tests, benchmarks and
single-machine simulations only. Secure aggregation (DESIGN §4), in which each
silo receives only its own weights and the coordinator learns only the sum,
implements the same interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from mor_secure.wire.client import SiloClient

from .router import fused_reward
from .silo_requests import ask_scores


@dataclass(frozen=True)
class FusionItems:
    """The rows to score: image file (the coordinator's public copy), prompt and response per row."""

    images: tuple[str | Path, ...]
    prompts: tuple[str, ...]
    responses: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.prompts) == len(self.responses)):
            raise ValueError(f"images, prompts and responses must have one entry per row, got lengths "
                             f"{len(self.images)}, {len(self.prompts)}, {len(self.responses)}")

    def __len__(self) -> int:
        return len(self.responses)


@runtime_checkable
class Fusion(Protocol):
    """Forms R = sum_k w_k r_k over a fixed, ordered set of silos."""

    @property
    def silo_names(self) -> tuple[str, ...]:
        """The silos, in the column order of `weights`."""
        ...

    def fuse(self, items: FusionItems, weights: torch.Tensor) -> torch.Tensor:
        """[N] fused rewards for N items, given [N, K] weights (rows sum to 1)."""
        ...


class ClearFusion:
    """Each silo scores every distinct row once; the weighted sum is formed here, in the clear.

    A group of `num_generations` one-word answers repeats itself (8 samples
    are often 2 or 3 distinct answers), so only distinct (image, prompt,
    response) rows are sent: the silos score, and are queried about, less.
    """

    def __init__(self, clients: Sequence[SiloClient]) -> None:
        clients = list(clients)
        if not clients:
            raise ValueError("fusion needs at least one silo client")
        for index, client in enumerate(clients):
            if not isinstance(client, SiloClient):
                raise ValueError(f"clients[{index}] is a {type(client).__name__}, expected a SiloClient "
                                 "(name, describe, score, correctness_bits)")
        names = [c.name for c in clients]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"each silo may appear once; repeated: {repeated}")
        self.clients = clients

    @property
    def silo_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.clients)

    def fuse(self, items: FusionItems, weights: torch.Tensor) -> torch.Tensor:
        if tuple(weights.shape) != (len(items), len(self.clients)):
            raise ValueError(f"weights have shape {tuple(weights.shape)}, expected {(len(items), len(self.clients))}")
        rows = list(zip(items.images, items.prompts, items.responses, strict=True))
        distinct = list(dict.fromkeys(rows))
        position = {row: i for i, row in enumerate(distinct)}
        index = torch.tensor([position[row] for row in rows], dtype=torch.long)
        images, prompts, responses = (list(column) for column in zip(*distinct, strict=True))
        scores = torch.stack([ask_scores(client, images, prompts, responses) for client in self.clients], dim=1)
        return fused_reward(weights, scores[index])


def as_fusion(silos: Fusion | Sequence[SiloClient]) -> Fusion:
    """A `Fusion` as is; a list of clients as their `ClearFusion` (tests and in-process simulations)."""
    if isinstance(silos, Fusion) and not isinstance(silos, (list, tuple)):
        return silos
    return ClearFusion(silos)
