"""The privacy ledger's file format: a hash chain of entries, its verification, and its errors.

Pure of locking and writing (those are `ledger`'s): given the parsed file,
`verify_chain` checks every entry's digest, index and predecessor, and the
bookkeeping (a settle names an open reservation, never for more than it
reserved; no entry takes the total over the budget), and raises
`LedgerTamperedError` naming the first bad entry.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "mor-privacy-ledger/1"
GENESIS_PREV = "0" * 64

# Relative slack when comparing summed charges with a budget, so that float
# rounding of a sum (0.1 + 0.2 > 0.3) cannot refuse a reservation that fits exactly.
BUDGET_RTOL = 1e-9
# What a declare_unit entry may name as the unit of DP-SGD charges recorded before guarantee_unit (`ledger_units`).
DECLARABLE_UNITS = ("image", "patient")

ENTRY_FIELDS = {
    "genesis": {"silo", "epsilon_budget", "delta_budget", "created", "supersedes"},
    "reserve": {"id", "timestamp", "purpose", "epsilon", "delta", "details"},
    "settle": {"reservation", "timestamp", "epsilon", "delta", "details"},
    # Once, by the operator: the unit of the DP-SGD charges recorded before guarantee_unit (`ledger_units`).
    "declare_unit": {"timestamp", "unit"},
}
NEW_LEDGER_IS_NOT_A_RESET = (
    "A new ledger (`mor silo init --config ...`) is only for a new silo or new data, never to reset a budget."
)


class LedgerError(ValueError):
    """The ledger file cannot be used as it is; the message says how to recover."""


class LedgerExistsError(LedgerError, FileExistsError):
    """`PrivacyLedger.create` was asked to create a ledger where one already exists."""


class LedgerMissingError(LedgerError, FileNotFoundError):
    """The ledger file is not there; it is never recreated implicitly."""


class LedgerMismatchError(LedgerError):
    """The ledger belongs to another silo, or has another budget, than the caller's config says."""


class LedgerTamperedError(LedgerError):
    """The file does not verify. `index`: position of the first bad entry (None: the file as a whole)."""

    def __init__(self, path: Path, index: int | None, problem: str) -> None:
        self.path, self.index, self.problem = path, index, problem
        where = "" if index is None else f" entry {index}"
        super().__init__(f"{path}: privacy ledger{where} {problem}. Restore the ledger from backup. "
                         + NEW_LEDGER_IS_NOT_A_RESET)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.index, self.problem)


class PrivacyUnitMismatchError(ValueError):
    """A charge is over another privacy unit than the ledger's earlier charges.

    Epsilons per pair and per patient do not add up to one guarantee (a
    per-pair epsilon says nothing useful about a patient with several pairs), so
    the sum a ledger checks against its budget is only meaningful over one unit.
    """


class BudgetExceededError(RuntimeError):
    """A reservation was refused because it would take the ledger over its budget.

    Carries every number, so a caller (e.g. an RPC handler answering
    RESOURCE_EXHAUSTED) can report them without parsing the message.
    """

    def __init__(self, *, requested_epsilon: float, spent_epsilon: float, budget_epsilon: float,
                 requested_delta: float, spent_delta: float, budget_delta: float) -> None:
        self.requested_epsilon = requested_epsilon
        self.spent_epsilon = spent_epsilon
        self.budget_epsilon = budget_epsilon
        self.requested_delta = requested_delta
        self.spent_delta = spent_delta
        self.budget_delta = budget_delta
        super().__init__(
            f"privacy budget exceeded: requested epsilon={requested_epsilon:g}, delta={requested_delta:g}; "
            f"already spent epsilon={spent_epsilon:g} of {budget_epsilon:g} "
            f"(remaining {max(budget_epsilon - spent_epsilon, 0.0):g}), "
            f"delta={spent_delta:g} of {budget_delta:g} "
            f"(remaining {max(budget_delta - spent_delta, 0.0):g}). "
            "Lower the target epsilon/delta of this request. A ledger's budget is fixed when the ledger is "
            "created and cannot be raised; reservations of runs that never settled stay charged."
        )


@dataclass
class ChainState:
    """A verified chain: its entries, genesis, reserve entries by id (in order), settle entries by reservation."""

    entries: list[dict[str, Any]]
    genesis: dict[str, Any] = field(default_factory=dict)
    reserves: dict[str, dict[str, Any]] = field(default_factory=dict)
    settles: dict[str, dict[str, Any]] = field(default_factory=dict)
    declared_unit: str | None = None

    def charged(self) -> tuple[float, float]:
        amounts = [self.settles.get(rid, r) for rid, r in self.reserves.items()]
        return math.fsum(a["epsilon"] for a in amounts), math.fsum(a["delta"] for a in amounts)

    def over(self, epsilon: float, delta: float) -> bool:
        """Whether charging (epsilon, delta) more would exceed the genesis budget (beyond float slack)."""
        spent_epsilon, spent_delta = self.charged()
        return (spent_epsilon + epsilon > self.genesis["epsilon_budget"] * (1 + BUDGET_RTOL)
                or spent_delta + delta > self.genesis["delta_budget"] * (1 + BUDGET_RTOL))


def read_chain_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise LedgerMissingError(f"{path}: privacy ledger not found. Restore it from backup. "
                                 + NEW_LEDGER_IS_NOT_A_RESET) from exc
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read the privacy ledger ({exc}); fix its permissions") from exc
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_reject_duplicate_keys)
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, duplicate keys
        raise LedgerTamperedError(path, None, f"is not valid JSON ({exc})") from exc


def verify_chain(path: Path, raw: Any) -> ChainState:
    """Check the chain and its bookkeeping entry by entry; raise `LedgerTamperedError` at the first bad one."""
    if not isinstance(raw, dict) or set(raw) != {"format", "entries"} or raw["format"] != FORMAT:
        raise LedgerTamperedError(path, None, f'is not a {FORMAT} file ({{"format": ..., "entries": [...]}})')
    if not isinstance(raw["entries"], list) or not raw["entries"]:
        raise LedgerTamperedError(path, None, "has no entries, not even its genesis")
    state = ChainState(raw["entries"])
    prev = GENESIS_PREV
    for i, entry in enumerate(state.entries):
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if not isinstance(kind, str) or kind not in ENTRY_FIELDS or (kind == "genesis") != (i == 0):
            raise LedgerTamperedError(path, i, f"has kind {kind!r}; entry 0 must be the genesis, others "
                                               "reserve, settle or declare_unit")
        expected = ENTRY_FIELDS[kind] | {"index", "kind", "prev", "digest"}
        if set(entry) != expected:
            raise LedgerTamperedError(path, i, f"has fields {sorted(entry)}, expected {sorted(expected)}")
        if entry["digest"] != _digest(entry):
            raise LedgerTamperedError(path, i, "does not match its digest: it was edited")
        if entry["index"] != i:
            raise LedgerTamperedError(path, i, f"says it is entry {entry['index']!r}: entries were deleted, "
                                               "inserted or moved")
        if entry["prev"] != prev:
            raise LedgerTamperedError(path, i, "does not follow the entry before it (prev digest mismatch): "
                                               "entries were deleted, inserted or moved")
        prev = entry["digest"]
        try:
            _apply(kind, entry, state)
        except ValueError as exc:
            raise LedgerTamperedError(path, i, str(exc)) from None
    return state


def _apply(kind: str, entry: dict[str, Any], state: ChainState) -> None:
    """Check one entry's values against the state so far and add it; ValueError says what is wrong."""
    if kind == "genesis":
        check_genesis_values(entry["silo"], entry["epsilon_budget"], entry["delta_budget"])
        if entry["supersedes"] is not None and not isinstance(entry["supersedes"], str):
            raise ValueError("has a supersedes that is neither a digest nor null")
        state.genesis = entry
        return
    if kind == "declare_unit":
        if (entry["unit"] not in DECLARABLE_UNITS or state.declared_unit is not None
                or not isinstance(entry["timestamp"], str)):
            raise ValueError(f"declares unit {entry['unit']!r}: declare_unit names image or patient, once, "
                             "with a timestamp")
        state.declared_unit = entry["unit"]
        return
    check_amounts(entry["epsilon"], entry["delta"])
    if not isinstance(entry["details"], dict) or not isinstance(entry["timestamp"], str):
        raise ValueError("has details that are not an object, or a timestamp that is not a string")
    if kind == "reserve":
        rid = entry["id"]
        if not isinstance(rid, str) or rid in state.reserves or not isinstance(entry["purpose"], str):
            raise ValueError(f"reuses reservation id {rid!r} or lacks a purpose")
        if state.over(entry["epsilon"], entry["delta"]):
            raise ValueError("takes the charged total over the budget, which reserve() never does")
        state.reserves[rid] = entry
        return
    rid = entry["reservation"]
    if not isinstance(rid, str) or rid not in state.reserves:
        raise ValueError(f"settles reservation {rid!r}, which no earlier entry reserved")
    if rid in state.settles:
        raise ValueError(f"settles reservation {rid!r} a second time")
    if entry["epsilon"] > state.reserves[rid]["epsilon"] or entry["delta"] > state.reserves[rid]["delta"]:
        raise ValueError(f"settles reservation {rid!r} for more than it reserved")
    state.settles[rid] = entry


def seal_entry(kind: str, body: dict[str, Any], *, index: int, prev: str) -> dict[str, Any]:
    entry = {"index": index, "kind": kind, "prev": prev, **body}
    entry["digest"] = _digest(entry)
    return entry


def _digest(entry: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of `entry` without its ``digest`` field."""
    body = {k: v for k, v in entry.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
                          .encode("utf-8")).hexdigest()


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError(f"duplicate key among {[k for k, _ in pairs]}")
    return dict(pairs)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_genesis_values(silo: str, epsilon_budget: float, delta_budget: float) -> None:
    if not isinstance(silo, str) or not silo.strip():
        raise ValueError(f"silo must be the silo's non-empty name, got {silo!r}")
    if not _is_number(epsilon_budget) or not (math.isfinite(epsilon_budget) and epsilon_budget > 0):
        raise ValueError(f"epsilon_budget must be a finite number > 0, got {epsilon_budget!r}")
    if not _is_number(delta_budget) or not (0 <= delta_budget < 1):
        raise ValueError(f"delta_budget must be in [0, 1), got {delta_budget!r}")


def check_amounts(epsilon: float, delta: float) -> None:
    if not _is_number(epsilon) or not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if not _is_number(delta) or not (0 <= delta <= 1):
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
