"""Persisted per-silo privacy ledger: a hash chain of reservations and settlements against a fixed budget.

One JSON file, ``{"format": "mor-privacy-ledger/1", "entries": [...]}``. Entry 0
(``genesis``) holds the silo, its lifetime (epsilon, delta) budget, when it was
created and the head digest of the ledger it supersedes (or null). Before a
mechanism runs it ``reserve``s its full cost; afterwards it may ``settle`` for
what it actually spent (at most the reservation). A reservation is charged its
settled amount once settled, its reserved amount until then: a run that crashed
or was killed stays charged for ever, as nobody can tell what it released.
Checking and charging are one locked step, so two jobs cannot both pass a check.

Creation is explicit (`PrivacyLedger.create`) and opening never creates: if it
did, deleting a silo's workdir would hand the silo a fresh budget.

Every entry carries ``prev`` (its predecessor's digest) and ``digest`` (sha256
of its canonical JSON without ``digest``); every read verifies the whole chain
and its bookkeeping. That detects an edited, deleted, inserted or moved entry.
The chain is unkeyed, so it does NOT detect removal of the newest entries (a
shortened chain is still valid) nor a chain recomputed by someone who can
write the file: the signed audit checkpoints (a later issue) anchor the head.

Every read goes to the file, so handles in several processes see each other's
entries. Writers hold an exclusive `flock` on a sidecar ``<name>.lock``,
re-read, verify, check and append; the new file is written to a temporary file
in the same directory, fsynced, moved into place with `os.replace` and the
directory fsynced, so a crash leaves the old or the new ledger, never half.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = "mor-privacy-ledger/1"
GENESIS_PREV = "0" * 64

# Relative slack when comparing summed charges with a budget, so that float
# rounding of a sum (0.1 + 0.2 > 0.3) cannot refuse a reservation that fits exactly.
_BUDGET_RTOL = 1e-9

_FIELDS = {
    "genesis": {"silo", "epsilon_budget", "delta_budget", "created", "supersedes"},
    "reserve": {"id", "timestamp", "purpose", "epsilon", "delta", "details"},
    "settle": {"reservation", "timestamp", "epsilon", "delta", "details"},
}
_NEW_LEDGER_IS_NOT_A_RESET = (
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
                         + _NEW_LEDGER_IS_NOT_A_RESET)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.index, self.problem)


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


@dataclass(frozen=True)
class Reservation:
    """An open charge made by `PrivacyLedger.reserve`; `settle` it once the mechanism has run."""

    id: str
    purpose: str
    epsilon: float
    delta: float
    timestamp: str


@dataclass(frozen=True)
class PrivacyCharge:
    """What one reservation costs: its settled amount if settled, else all it reserved.

    `details` are the settle entry's if settled (for training, the privacy
    report, so an auditor can recompute epsilon), else the reservation's.
    """

    reservation_id: str
    timestamp: str
    purpose: str
    epsilon: float
    delta: float
    reserved_epsilon: float
    reserved_delta: float
    settled: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class _State:
    """A verified chain: its entries, genesis, reserve entries by id (in order), settle entries by reservation."""

    entries: list[dict[str, Any]]
    genesis: dict[str, Any] = field(default_factory=dict)
    reserves: dict[str, dict[str, Any]] = field(default_factory=dict)
    settles: dict[str, dict[str, Any]] = field(default_factory=dict)

    def charged(self) -> tuple[float, float]:
        amounts = [self.settles.get(rid, r) for rid, r in self.reserves.items()]
        return math.fsum(a["epsilon"] for a in amounts), math.fsum(a["delta"] for a in amounts)

    def over(self, epsilon: float, delta: float) -> bool:
        """Whether charging (epsilon, delta) more would exceed the genesis budget (beyond float slack)."""
        spent_epsilon, spent_delta = self.charged()
        return (spent_epsilon + epsilon > self.genesis["epsilon_budget"] * (1 + _BUDGET_RTOL)
                or spent_delta + delta > self.genesis["delta_budget"] * (1 + _BUDGET_RTOL))


class PrivacyLedger:
    """Opens the existing ledger at `path`, which must be silo `silo`'s with budget (epsilon_budget, delta_budget).

    Charges compose by basic sequential composition: epsilons add and deltas
    add (Dwork & Roth 2014, Thm 3.16). This is conservative — advanced or
    numerical composition of the whole history would give a smaller total —
    but it holds for any mix of mechanisms (DP-SGD runs, randomized response),
    which is what a ledger of heterogeneous charges needs.

    Raises `LedgerMissingError` if there is no file (and creates nothing),
    `LedgerMismatchError` if the file is another silo's or has another budget,
    `LedgerTamperedError` if it does not verify.
    """

    def __init__(self, path: str | Path, *, silo: str, epsilon_budget: float, delta_budget: float) -> None:
        _check_genesis_values(silo, epsilon_budget, delta_budget)
        self._path = Path(path)
        self._silo = silo
        self._epsilon_budget = float(epsilon_budget)
        self._delta_budget = float(delta_budget)
        self._state()

    @classmethod
    def create(cls, path: str | Path, *, silo: str, epsilon_budget: float, delta_budget: float,
               force: bool = False) -> PrivacyLedger:
        """Start the ledger of a new silo, or of a silo with new data, and return it opened.

        Refuses with `LedgerExistsError` if a ledger is at `path`. With
        `force=True` the old ledger (which must verify) is kept as
        ``<name>.superseded-<UTC time>`` and the new genesis names its head digest.
        """
        _check_genesis_values(silo, epsilon_budget, delta_budget)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            supersedes = None
            if path.exists():
                if not force:
                    raise LedgerExistsError(
                        f"{path}: a privacy ledger already exists; open it with PrivacyLedger(...) instead. "
                        f"{_NEW_LEDGER_IS_NOT_A_RESET} For that case only, pass force=True: the old ledger is "
                        "kept as a superseded file.")
                supersedes = _verify(path, _read_json(path)).entries[-1]["digest"]
                kept = path.with_name(f"{path.name}.superseded-{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}")
                logger.warning(
                    "privacy ledger %s: FORCED NEW LEDGER for silo %r. This discards the record of past spends "
                    "(the old ledger is kept as %s, head %s). Training again on the same data under the new "
                    "budget VOIDS the differential-privacy guarantee: this is only correct for new data.",
                    path, silo, kept, supersedes)
                os.link(path, kept)  # never overwrites, and the ledger path exists at every moment
            genesis = {"silo": silo, "epsilon_budget": float(epsilon_budget), "delta_budget": float(delta_budget),
                       "created": _now(), "supersedes": supersedes}
            _write(path, [_seal("genesis", genesis, index=0, prev=GENESIS_PREV)])
        logger.info("privacy ledger %s: created for silo %r, budget epsilon=%g delta=%g",
                    path, silo, epsilon_budget, delta_budget)
        return cls(path, silo=silo, epsilon_budget=epsilon_budget, delta_budget=delta_budget)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def silo(self) -> str:
        return self._silo

    @property
    def epsilon_budget(self) -> float:
        return self._epsilon_budget

    @property
    def delta_budget(self) -> float:
        return self._delta_budget

    @property
    def spent_epsilon(self) -> float:
        """Sum of all charged epsilons (basic composition; conservative)."""
        return self._state().charged()[0]

    @property
    def spent_delta(self) -> float:
        """Sum of all charged deltas (basic composition; conservative)."""
        return self._state().charged()[1]

    @property
    def remaining_epsilon(self) -> float:
        return max(self._epsilon_budget - self.spent_epsilon, 0.0)

    @property
    def remaining_delta(self) -> float:
        return max(self._delta_budget - self.spent_delta, 0.0)

    @property
    def charges(self) -> tuple[PrivacyCharge, ...]:
        """One charge per reservation, oldest first."""
        state = self._state()
        charges = []
        for rid, r in state.reserves.items():
            charged = state.settles.get(rid, r)
            charges.append(PrivacyCharge(
                reservation_id=rid, timestamp=r["timestamp"], purpose=r["purpose"], epsilon=charged["epsilon"],
                delta=charged["delta"], reserved_epsilon=r["epsilon"], reserved_delta=r["delta"],
                settled=rid in state.settles, details=charged["details"]))
        return tuple(charges)

    @property
    def open_reservations(self) -> tuple[str, ...]:
        """Ids of reservations not settled: still running, or crashed and so charged in full for ever."""
        state = self._state()
        return tuple(rid for rid in state.reserves if rid not in state.settles)

    @property
    def head_digest(self) -> str:
        """Digest of the newest entry; a checkpoint of it elsewhere detects a truncated ledger."""
        return self._state().entries[-1]["digest"]

    def check_affordable(self, *, epsilon: float, delta: float) -> None:
        """Raise `BudgetExceededError` unless (epsilon, delta) fits now. Read-only: `reserve` is what charges."""
        _check_amounts(epsilon, delta)
        self._check_affordable(self._state(), epsilon, delta)

    def reserve(self, *, purpose: str, epsilon: float, delta: float,
                details: dict[str, Any] | None = None) -> Reservation:
        """Charge (epsilon, delta) before the mechanism runs, or raise `BudgetExceededError` and change nothing."""
        if not isinstance(purpose, str) or not purpose.strip():
            raise ValueError(f"purpose must be a non-empty string saying what the spend is for, got {purpose!r}")
        _check_amounts(epsilon, delta)
        body = {"id": uuid.uuid4().hex, "timestamp": _now(), "purpose": purpose, "epsilon": float(epsilon),
                "delta": float(delta), "details": _json_details(details)}
        with _locked(self._path):
            state = self._state()
            self._check_affordable(state, body["epsilon"], body["delta"])
            self._append(state, "reserve", body)
        logger.info("privacy ledger %s: reserved %s for %s: epsilon=%g delta=%g",
                    self._path, body["id"], purpose, epsilon, delta)
        return Reservation(id=body["id"], purpose=purpose, epsilon=body["epsilon"], delta=body["delta"],
                           timestamp=body["timestamp"])

    def settle(self, reservation: Reservation | str, *, epsilon: float, delta: float,
               details: dict[str, Any] | None = None) -> None:
        """Record what an open reservation really spent (at most what it reserved); the rest is freed."""
        rid = reservation.id if isinstance(reservation, Reservation) else reservation
        if not isinstance(rid, str):
            raise TypeError(f"settle() takes a Reservation or its id, got {type(reservation).__name__}")
        _check_amounts(epsilon, delta)
        body = {"reservation": rid, "timestamp": _now(), "epsilon": float(epsilon), "delta": float(delta),
                "details": _json_details(details)}
        with _locked(self._path):
            state = self._state()
            reserved = state.reserves.get(rid)
            if reserved is None:
                raise ValueError(f"{self._path}: no reservation {rid!r} in this ledger; settle what reserve() "
                                 "returned on this ledger")
            if rid in state.settles:
                raise ValueError(f"{self._path}: reservation {rid!r} is already settled; settle it only once")
            if body["epsilon"] > reserved["epsilon"] or body["delta"] > reserved["delta"]:
                raise ValueError(
                    f"{self._path}: cannot settle epsilon={epsilon:g}, delta={delta:g} on reservation {rid!r}, "
                    f"which reserved epsilon={reserved['epsilon']:g}, delta={reserved['delta']:g}: a settlement "
                    "may not exceed its reservation. Reserve at least what the mechanism can spend, before it runs.")
            self._append(state, "settle", body)
        logger.info("privacy ledger %s: settled %s: epsilon=%g delta=%g", self._path, rid, epsilon, delta)

    def _append(self, state: _State, kind: str, body: dict[str, Any]) -> None:
        head = state.entries[-1]
        _write(self._path, [*state.entries, _seal(kind, body, index=head["index"] + 1, prev=head["digest"])])

    def _check_affordable(self, state: _State, epsilon: float, delta: float) -> None:
        if state.over(epsilon, delta):
            spent_epsilon, spent_delta = state.charged()
            error = BudgetExceededError(
                requested_epsilon=epsilon, spent_epsilon=spent_epsilon, budget_epsilon=self._epsilon_budget,
                requested_delta=delta, spent_delta=spent_delta, budget_delta=self._delta_budget)
            logger.warning("privacy ledger %s: refused: %s", self._path, error)
            raise error

    def _state(self) -> _State:
        """Read and verify the file, and check that it is this silo's ledger with this budget."""
        state = _verify(self._path, _read_json(self._path))
        g = state.genesis
        if g["silo"] != self._silo:
            raise LedgerMismatchError(
                f"{self._path}: this privacy ledger belongs to silo {g['silo']!r}, but the config names silo "
                f"{self._silo!r}. Point the config at this silo's own ledger, or correct the silo name.")
        if (g["epsilon_budget"], g["delta_budget"]) != (self._epsilon_budget, self._delta_budget):
            raise LedgerMismatchError(
                f"{self._path}: privacy ledger was created with budget epsilon={g['epsilon_budget']}, "
                f"delta={g['delta_budget']}, but this silo is configured with epsilon={self._epsilon_budget}, "
                f"delta={self._delta_budget}. A ledger's budget is fixed when it is created, so that editing a "
                "config cannot change it: make the config match the ledger.")
        return state


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise LedgerMissingError(f"{path}: privacy ledger not found. Restore it from backup. "
                                 + _NEW_LEDGER_IS_NOT_A_RESET) from exc
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read the privacy ledger ({exc}); fix its permissions") from exc
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_reject_duplicate_keys)
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, duplicate keys
        raise LedgerTamperedError(path, None, f"is not valid JSON ({exc})") from exc


def _verify(path: Path, raw: Any) -> _State:
    """Check the chain and its bookkeeping entry by entry; raise `LedgerTamperedError` at the first bad one."""
    if not isinstance(raw, dict) or set(raw) != {"format", "entries"} or raw["format"] != FORMAT:
        raise LedgerTamperedError(path, None, f'is not a {FORMAT} file ({{"format": ..., "entries": [...]}})')
    if not isinstance(raw["entries"], list) or not raw["entries"]:
        raise LedgerTamperedError(path, None, "has no entries, not even its genesis")
    state = _State(raw["entries"])
    prev = GENESIS_PREV
    for i, entry in enumerate(state.entries):
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if not isinstance(kind, str) or kind not in _FIELDS or (kind == "genesis") != (i == 0):
            raise LedgerTamperedError(path, i, f"has kind {kind!r}; entry 0 must be the genesis, others "
                                               "reserve or settle")
        expected = _FIELDS[kind] | {"index", "kind", "prev", "digest"}
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


def _apply(kind: str, entry: dict[str, Any], state: _State) -> None:
    """Check one entry's values against the state so far and add it; ValueError says what is wrong."""
    if kind == "genesis":
        _check_genesis_values(entry["silo"], entry["epsilon_budget"], entry["delta_budget"])
        if entry["supersedes"] is not None and not isinstance(entry["supersedes"], str):
            raise ValueError("has a supersedes that is neither a digest nor null")
        state.genesis = entry
        return
    _check_amounts(entry["epsilon"], entry["delta"])
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


def _seal(kind: str, body: dict[str, Any], *, index: int, prev: str) -> dict[str, Any]:
    entry = {"index": index, "kind": kind, "prev": prev, **body}
    entry["digest"] = _digest(entry)
    return entry


def _digest(entry: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of `entry` without its ``digest`` field."""
    body = {k: v for k, v in entry.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
                          .encode("utf-8")).hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # A sidecar file: the ledger itself is replaced on every write, so a lock
    # held on its inode would not exclude the next writer.
    try:
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError as exc:
        raise LedgerMissingError(f"{path}: the privacy ledger's directory is gone. Restore it from backup. "
                                 + _NEW_LEDGER_IS_NOT_A_RESET) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    text = json.dumps({"format": FORMAT, "entries": entries}, indent=2, allow_nan=False)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _json_details(details: dict[str, Any] | None) -> dict[str, Any]:
    """A JSON round-trip copy of `details`: what is hashed now is exactly what a later read parses."""
    if details is None:
        return {}
    if not isinstance(details, dict):
        raise ValueError(f"details must be a dict, got {type(details).__name__}")
    try:
        return json.loads(json.dumps(details, allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"details must be JSON-serialisable (str keys, finite numbers): {exc}") from exc


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError(f"duplicate key among {[k for k, _ in pairs]}")
    return dict(pairs)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_genesis_values(silo: str, epsilon_budget: float, delta_budget: float) -> None:
    if not isinstance(silo, str) or not silo.strip():
        raise ValueError(f"silo must be the silo's non-empty name, got {silo!r}")
    if not _is_number(epsilon_budget) or not (math.isfinite(epsilon_budget) and epsilon_budget > 0):
        raise ValueError(f"epsilon_budget must be a finite number > 0, got {epsilon_budget!r}")
    if not _is_number(delta_budget) or not (0 <= delta_budget < 1):
        raise ValueError(f"delta_budget must be in [0, 1), got {delta_budget!r}")


def _check_amounts(epsilon: float, delta: float) -> None:
    if not _is_number(epsilon) or not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if not _is_number(delta) or not (0 <= delta <= 1):
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
