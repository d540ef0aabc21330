"""What one unit of each ledger charge's guarantee is, and the rule that one ledger holds charges over one unit.

Pure (no file, no lock; `ledger` holds those). Epsilons over different units
do not add up to one guarantee: a per-pair epsilon says nothing useful about
a patient with several pairs (group privacy for (epsilon, delta)-DP), and per
image and per patient differ both ways (a per-image run does not protect a
patient with several images at its epsilon; a per-patient run covers one image of a patient with
several only as a substitution, since removing it changes the patient's unit
instead of removing it, and Opacus' accountant is for add/remove: accounted
directly, 15.6 for hospital-a's demo setting at epsilon 8; `training_config`).

A DP-SGD charge recorded before `guarantee_unit` existed says only
`privacy_unit: image`, which then meant "one clipped gradient per unit": per
patient if the silo's rows named a unit_id, per image if not. Its unit is
unknown until the operator declares it once (`declare_earlier_unit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mor_secure.privacy.ledger_chain import DECLARABLE_UNITS, ChainState, PrivacyUnitMismatchError

# The reservation details' key naming the run's `DPConfig.privacy_unit` ("image": one gradient per unit, "pair").
PRIVACY_UNIT = "privacy_unit"
# The key naming what one unit of the guarantee is: "patient", "image" or "pair".
GUARANTEE_UNIT = "guarantee_unit"
# The unit of an earlier DP-SGD charge that recorded no guarantee_unit, while none is declared.
UNDECLARED_EARLIER_UNIT = "image or patient (recorded before data.unit; undeclared)"

_HOW_TO_TRAIN_PER = {"pair": "dp.privacy_unit: pair", "image": "dp.privacy_unit: image, and data.unit: image for "
                     "your own data", "patient": "dp.privacy_unit: image and data.unit: patient"}


def predates_guarantee_unit(details: Mapping[str, Any]) -> bool:
    """A DP-SGD reservation per unit that does not say whether its units were images or patients."""
    return (details.get("mechanism") == "dp-sgd" and details.get(PRIVACY_UNIT) == "image"
            and GUARANTEE_UNIT not in details)


def declaration_problem(details: Mapping[str, Any]) -> str | None:
    """Why a new DP-SGD reservation's details do not say what one unit of its guarantee is (None: they do)."""
    if details.get("mechanism") != "dp-sgd":
        return None
    allowed = {"pair": ("pair",), "image": DECLARABLE_UNITS}.get(details.get(PRIVACY_UNIT))
    if allowed is None:
        return f"its privacy_unit is {details.get(PRIVACY_UNIT)!r}, not image or pair"
    if details.get(GUARANTEE_UNIT) not in allowed:
        return (f"with privacy_unit {details[PRIVACY_UNIT]!r}, its guarantee_unit must be "
                f"{' or '.join(allowed)} (what its units are), got {details.get(GUARANTEE_UNIT)!r}")
    return None


def unit_of(details: Mapping[str, Any], *, declared_earlier_unit: str | None) -> Any:
    """A charge's unit, from its reservation's details: guarantee_unit, else (an earlier DP-SGD charge) the
    declared unit, else privacy_unit (None: the charge names no unit, as for a non-DP-SGD mechanism)."""
    if GUARANTEE_UNIT in details:
        return details[GUARANTEE_UNIT]
    if predates_guarantee_unit(details):
        return declared_earlier_unit or UNDECLARED_EARLIER_UNIT
    return details.get(PRIVACY_UNIT)


def check_one_unit(path: Any, state: ChainState, unit: Any) -> None:
    """Raise `PrivacyUnitMismatchError` unless a new charge over `unit` matches the ledger's spent charges."""
    if unit is None:  # a charge that names no unit (not a DP-SGD run) has none to compare
        return
    earlier = {unit_of(r["details"], declared_earlier_unit=state.declared_unit)
               for r in _spent_reserves(state)} - {None}
    if UNDECLARED_EARLIER_UNIT in earlier:
        raise PrivacyUnitMismatchError(
            f"{path}: its earlier DP-SGD charges were recorded before data.unit existed, so they do not say whether "
            "they were per patient (the silo's rows named a unit_id) or per image (no row did, or the easy-VQA "
            "partition). Declare which, once, with `mor silo ledger --config SILO.yaml --declare-earlier-unit "
            "patient` (or `image`); if some rows named a unit_id and some did not, neither holds, and this ledger "
            "can take no further training.")
    if earlier - {unit}:
        only = next(iter(earlier)) if len(earlier) == 1 else None
        fix = (f"To charge this ledger, train per {only} (the unit its budget protects: "
               f"{_HOW_TO_TRAIN_PER.get(only, 'the unit its earlier charges name')})"
               if only is not None else "Charge it only over the unit of its earlier charges")
        raise PrivacyUnitMismatchError(
            f"{path}: this charge is per {unit!r}, but its earlier charges are per "
            f"{' and '.join(sorted(map(repr, earlier)))}: epsilons over different privacy units do not add up "
            f"to one guarantee, so one ledger holds charges over one unit. {fix}.")


def check_declarable(path: Any, state: ChainState, unit: str) -> None:
    """Raise ValueError unless `unit` may be declared for the ledger's earlier charges now."""
    if unit not in DECLARABLE_UNITS:
        raise ValueError(f"the earlier charges' unit is one of {', '.join(DECLARABLE_UNITS)}, got {unit!r}")
    if state.declared_unit is not None:
        raise ValueError(f"{path}: the unit of its earlier charges was declared already ({state.declared_unit}); "
                         "it is declared once and never changed")
    spent = _spent_reserves(state)
    if not any(predates_guarantee_unit(r["details"]) for r in spent):
        raise ValueError(f"{path}: every charge that spent budget in it names its unit already; there is nothing "
                         "to declare")
    later = {r["details"][GUARANTEE_UNIT] for r in spent if GUARANTEE_UNIT in r["details"]} - {unit}
    if later:
        raise ValueError(
            f"{path}: its charges that name their unit are per {' and '.join(sorted(later))}, not {unit}: declare "
            f"{' or '.join(sorted(later))} if the earlier ones were per that too; if they were not, the ledger "
            "already mixes units and can take no more training")


def _spent_reserves(state: ChainState) -> list[dict[str, Any]]:
    """The reserve entries of charges that spend budget (a reservation released unspent binds no unit)."""
    return [r for rid, r in state.reserves.items()
            if any(state.settles.get(rid, r)[amount] > 0 for amount in ("epsilon", "delta"))]
