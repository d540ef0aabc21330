"""Privacy units for DP-SGD: all pairs of one unit (an image, a patient) are one DP sample.

A hospital promises privacy per patient, not per preference pair. easy-VQA
has ~9.6 questions per image, and a pair-level (epsilon 8, delta 1e-5)
guarantee says nothing useful about an image of several pairs (group privacy
for (epsilon, delta)-DP multiplies delta by 1 + e^epsilon + ... +
e^((k-1) epsilon); `training_config.PER_PAIR_UNITS`). DP-SGD protects a unit directly when
the unit is the sample: Poisson sampling draws units, and each unit
contributes ONE clipped gradient, the mean of its pairs' gradients.

How, with any architecture: a unit is stored as K pair rows (padded with a
copy of its first pair, masked out), the model sees the K * b rows flattened
as usual, Opacus' hooks compute one gradient per row, and
`sum_grad_samples_per_unit` adds each unit's K rows into one before the DP
optimizer clips. A module that scores [b, K, ...] inputs directly
(`scores_unit_batches`) skips the flattening: Opacus then sums the K rows
inside each per-sample gradient and keeps b gradients instead of b * K. Either
way the loss weights in `unit_weights` make a unit's gradient the mean over
its real pairs and give padded rows zero gradient.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset


@dataclass(frozen=True)
class UnitGrouping:
    """Which pairs form each unit, after the optional cap; local facts, never released."""

    groups: tuple[tuple[int, ...], ...]
    pairs_per_unit: int
    dropped_pairs: int

    @property
    def units(self) -> int:
        return len(self.groups)


def group_pairs_by_unit(unit_ids: Sequence[Hashable], *, max_pairs_per_unit: int | None,
                        seed: int) -> UnitGrouping:
    """Group pair indices by unit id (first-seen order); keep a seeded sample of at most `max_pairs_per_unit`.

    The cap bounds the padding (every unit is padded to the largest one) and
    the memory of per-row gradients; it does not change the privacy unit.
    Each unit's sample depends on `seed`, its id and its own pairs only.
    """
    if max_pairs_per_unit is not None and max_pairs_per_unit < 1:
        raise ValueError(f"max_pairs_per_unit must be >= 1 or None, got {max_pairs_per_unit!r}")
    by_unit: dict[Hashable, list[int]] = {}
    for index, unit in enumerate(unit_ids):
        by_unit.setdefault(unit, []).append(index)
    if not by_unit:
        raise ValueError("no pairs to group into privacy units")
    groups, dropped = [], 0
    for unit, members in by_unit.items():
        if max_pairs_per_unit is not None and len(members) > max_pairs_per_unit:
            dropped += len(members) - max_pairs_per_unit
            # One stream per unit: which pairs a unit keeps must not depend on which other units
            # exist, or datasets one unit apart would train on sets many units apart.
            members = sorted(random.Random(f"{seed}/{unit!r}").sample(members, max_pairs_per_unit))
        groups.append(tuple(members))
    return UnitGrouping(groups=tuple(groups), pairs_per_unit=max(len(g) for g in groups), dropped_pairs=dropped)


def held_out_units(units: Iterable[str], *, fraction: float, salt: str) -> frozenset[str]:
    """The units to hold out of DP training: each one on a keyed hash of its own id, with probability `fraction`.

    DP-SGD's guarantee holds between training sets one unit apart, so the
    split must keep datasets one unit apart that close: a unit's side depends
    on `salt` and its id alone (a seeded shuffle of all units would move many
    units when one is added). So few units may hold none out. There is no
    fallback (until 2026-12-07 the lowest hash was held out when none fell
    under the threshold): under `dp.privacy_unit: pair`, removing the one pair
    of that unit moved the next-lowest unit, all its pairs, out of training,
    so datasets one pair apart trained on sets several pairs apart.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction!r}")
    threshold = fraction * 2**64
    return frozenset(unit for unit in units
                     if int.from_bytes(hashlib.sha256(f"{salt}/{unit}".encode()).digest()[:8], "big") < threshold)


def unit_dataset(pairs: Dataset, grouping: UnitGrouping) -> TensorDataset:
    """Item u: each input tensor of `pairs` for unit u's K rows ([K, ...]), then a [K] mask of real rows.

    Built once (one gather per input tensor), not per item: an epoch then
    costs what a pair dataset's does.
    """
    k = grouping.pairs_per_unit
    # Padding repeats a real pair: valid inputs for every architecture; its weight is 0.
    index = torch.tensor([[*members, *[members[0]] * (k - len(members))] for members in grouping.groups])
    mask = torch.tensor([[1.0] * len(members) + [0.0] * (k - len(members)) for members in grouping.groups])
    columns = [torch.stack(column) for column in zip(*(pairs[i] for i in range(len(pairs))))]
    return TensorDataset(*(column[index] for column in columns), mask)


def flatten_units(tensors: Sequence[Tensor]) -> list[Tensor]:
    """[b, K, ...] -> [b * K, ...]: the models see pair rows as they always do."""
    return [t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]) for t in tensors]


def scores_unit_batches(model: nn.Module) -> bool:
    """Whether `model` (or the module Opacus wraps) scores [b, K, ...] inputs as [b, K] directly.

    Such a model needs no flattening: Opacus' linear grad sampler sums over
    the K axis inside each row's gradient, so a step keeps b per-sample
    gradients instead of b * K (the K-fold memory and time of the flat path).
    """
    return bool(getattr(getattr(model, "_module", model), "scores_unit_batches", False))


def unit_weights(mask: Tensor, *, flat: bool) -> Tensor:
    """Loss weights for a [b, K] mask under Opacus' "mean" loss reduction: [b * K] if `flat`, else [b, K].

    Opacus scales each row's gradient by the n rows it sees (it assumes
    loss = mean over rows; n = b * K flat, b in the unit layout), so weight
    mask / (count_u * n) makes a unit's gradient the mean gradient of its
    real pairs, and padded rows contribute nothing. With K = 1 it is the plain mean.
    """
    counts = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    weights = mask / counts / (mask.numel() if flat else mask.shape[0])
    return weights.reshape(-1) if flat else weights


def sum_grad_samples_per_unit(model: nn.Module, *, units: int, pairs_per_unit: int) -> None:
    """Replace each trainable parameter's per-row `grad_sample` [b * K, ...] by per-unit sums [b, ...].

    Called between backward and the DP optimizer's step, so the optimizer
    clips one gradient per unit: the sensitivity of a step is one unit's.
    """
    for p in model.parameters():
        if not p.requires_grad:
            continue
        grad_sample = getattr(p, "grad_sample", None)
        if not isinstance(grad_sample, Tensor):
            raise RuntimeError("expected one per-row grad_sample tensor per parameter (Opacus hooks, Poisson "
                               f"sampling); got {type(grad_sample).__name__}")
        if grad_sample.shape[0] != units * pairs_per_unit:
            raise RuntimeError(f"grad_sample has {grad_sample.shape[0]} rows, expected {units} units x "
                               f"{pairs_per_unit} rows")
        p.grad_sample = grad_sample.reshape(units, pairs_per_unit, *grad_sample.shape[1:]).sum(dim=1)
