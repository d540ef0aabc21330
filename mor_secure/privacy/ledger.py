"""Persisted per-silo privacy ledger: a hash chain of reservations and settlements against a fixed budget.

One JSON file, ``{"format": "mor-privacy-ledger/1", "entries": [...]}``. Entry 0
(``genesis``) holds the silo, its lifetime (epsilon, delta) budget, when it was
created and the head digest of the ledger it supersedes (or null). Before a
mechanism runs it ``reserve``s its full cost; afterwards it may ``settle`` for
what it actually spent (at most the reservation). A reservation is charged its
settled amount once settled, its reserved amount until then: a run that crashed
or was killed stays charged for ever, as nobody can tell what it released.
Checking and charging are one locked step, so two jobs cannot both pass a check.
The charges of one ledger are over one privacy unit (`PrivacyLedger.reserve`).

Creation is explicit (`PrivacyLedger.create`) and opening never creates: if it
did, deleting a silo's workdir would hand the silo a fresh budget.

Every entry carries ``prev`` (its predecessor's digest) and ``digest`` (sha256
of its canonical JSON without ``digest``); every read verifies the whole chain
and its bookkeeping (`ledger_chain`, the file format and its errors). That detects an edited, deleted, inserted or moved entry.
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
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mor_secure.privacy.ledger_chain import (
    FORMAT,
    GENESIS_PREV,
    NEW_LEDGER_IS_NOT_A_RESET,
    BudgetExceededError,
    ChainState,
    LedgerError,
    LedgerExistsError,
    LedgerMismatchError,
    LedgerMissingError,
    LedgerTamperedError,
    PrivacyUnitMismatchError,
    check_amounts,
    check_genesis_values,
    read_chain_file,
    seal_entry,
    verify_chain,
)
from mor_secure.privacy.ledger_units import check_declarable, check_one_unit, declaration_problem, unit_of

__all__ = [
    "BudgetExceededError",
    "LedgerError",
    "LedgerExistsError",
    "LedgerMismatchError",
    "LedgerMissingError",
    "LedgerTamperedError",
    "PrivacyCharge",
    "PrivacyLedger",
    "PrivacyUnitMismatchError",
    "Reservation",
]

logger = logging.getLogger(__name__)


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
    `privacy_unit` and `noise` are what the reservation declared before the
    mechanism ran (its details' guarantee_unit, else privacy_unit, and noise;
    None if it named none):
    what one unit of the guarantee is, and where the noise came from.
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
    privacy_unit: str | None = None
    noise: str | None = None


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
        check_genesis_values(silo, epsilon_budget, delta_budget)
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
        check_genesis_values(silo, epsilon_budget, delta_budget)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            supersedes = None
            if path.exists():
                if not force:
                    raise LedgerExistsError(
                        f"{path}: a privacy ledger already exists; open it with PrivacyLedger(...) instead. "
                        f"{NEW_LEDGER_IS_NOT_A_RESET} For that case only, pass force=True: the old ledger is "
                        "kept as a superseded file.")
                supersedes = verify_chain(path, read_chain_file(path)).entries[-1]["digest"]
                kept = path.with_name(f"{path.name}.superseded-{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}")
                logger.warning(
                    "privacy ledger %s: FORCED NEW LEDGER for silo %r. This discards the record of past spends "
                    "(the old ledger is kept as %s, head %s). Training again on the same data under the new "
                    "budget VOIDS the differential-privacy guarantee: this is only correct for new data.",
                    path, silo, kept, supersedes)
                os.link(path, kept)  # never overwrites, and the ledger path exists at every moment
            genesis = {"silo": silo, "epsilon_budget": float(epsilon_budget), "delta_budget": float(delta_budget),
                       "created": _now(), "supersedes": supersedes}
            _write(path, [seal_entry("genesis", genesis, index=0, prev=GENESIS_PREV)])
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
                settled=rid in state.settles, details=charged["details"],
                privacy_unit=unit_of(r["details"], declared_earlier_unit=state.declared_unit),
                noise=r["details"].get("noise")))
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
        check_amounts(epsilon, delta)
        self._check_affordable(self._state(), epsilon, delta)

    def reserve(self, *, purpose: str, epsilon: float, delta: float,
                details: dict[str, Any] | None = None) -> Reservation:
        """Charge (epsilon, delta) before the mechanism runs, or raise `BudgetExceededError` and change nothing.

        ``details["privacy_unit"]`` says what one unit of the guarantee is
        ("image": a patient or image, "pair"), and ``details["guarantee_unit"]``
        more finely where the caller knows ("patient", "image", "pair"); the
        finer one, where given, is the charge's unit. It must be the unit of the
        ledger's earlier charges, or `PrivacyUnitMismatchError` is raised and
        nothing changes: epsilons over different units do not add up to one
        guarantee. A charge released unspent (settled at zero), or one that
        names no unit, binds none. A DP-SGD charge must name its guarantee_unit
        (as `run_declaration` does), one its privacy_unit allows: "image" alone no longer says it.
        """
        if not isinstance(purpose, str) or not purpose.strip():
            raise ValueError(f"purpose must be a non-empty string saying what the spend is for, got {purpose!r}")
        check_amounts(epsilon, delta)
        body = {"id": uuid.uuid4().hex, "timestamp": _now(), "purpose": purpose, "epsilon": float(epsilon),
                "delta": float(delta), "details": _json_details(details)}
        problem = declaration_problem(body["details"])
        if problem is not None:
            raise ValueError(f"a DP-SGD reservation must say what one unit of its guarantee is, but {problem}; "
                             "reserve with details=run_declaration(dp, units_are=...)")
        with _locked(self._path):
            state = self._state()
            check_one_unit(self._path, state, unit_of(body["details"], declared_earlier_unit=None))
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
        check_amounts(epsilon, delta)
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

    def check_open(self, reservation: Reservation, *, declared: Mapping[str, Any]) -> None:
        """Raise ValueError unless `reservation` is open in this ledger, as reserved, with these declared details.

        For a mechanism handed a reservation, before it runs: `settle` checks
        the same at the end, when every noisy step has already run; and the
        ledger reads a charge's unit and noise from what its reservation
        declared, so a run must be the one it declared.
        """
        with _locked(self._path):
            state = self._state()
        reserved = state.reserves.get(reservation.id)
        if reserved is None:
            raise ValueError(f"{self._path}: reservation {reservation.id!r} was not made in this ledger; pass the "
                             "ledger that reserve() was called on")
        if reservation.id in state.settles:
            raise ValueError(f"{self._path}: reservation {reservation.id!r} is already settled; reserve again for "
                             "this run")
        if (reserved["epsilon"], reserved["delta"], reserved["purpose"]) != (
                reservation.epsilon, reservation.delta, reservation.purpose):
            raise ValueError(f"{self._path}: reservation {reservation.id!r} (epsilon={reservation.epsilon:g}, "
                             f"delta={reservation.delta:g}) does not match what the ledger reserved "
                             f"(epsilon={reserved['epsilon']:g}, delta={reserved['delta']:g}); pass what "
                             "reserve() returned")
        for key, value in declared.items():
            if reserved["details"].get(key) != value:
                raise ValueError(f"{self._path}: reservation {reservation.id!r} declared {key} "
                                 f"{reserved['details'].get(key)!r}, but this run uses {value!r}; reserve with "
                                 f"details {{{key!r}: {value!r}}} (a charge is read as what its reservation "
                                 "declared)")

    def declare_earlier_unit(self, unit: str) -> None:
        """Record, once, what the units of the DP-SGD charges made before guarantee_unit existed were: "patient"
        (the silo's rows named a unit_id) or "image" (none did). Those charges are then over that unit; until
        then the ledger takes no charge over any unit (`ledger_units`)."""
        with _locked(self._path):
            state = self._state()
            check_declarable(self._path, state, unit)
            self._append(state, "declare_unit", {"timestamp": _now(), "unit": unit})
        logger.warning("privacy ledger %s: the charges recorded before data.unit are DECLARED per %s by the "
                       "operator; the ledger takes charges per %s from now on", self._path, unit, unit)

    def release(self, reservation: Reservation, *, reason: str) -> None:
        """Settle an open reservation at zero because its mechanism never ran (nothing was released).

        For failures before the first noisy step only (a config or data error):
        once a mechanism has run, settle what it spent instead.
        """
        self.settle(reservation, epsilon=0.0, delta=0.0, details={"outcome": f"released unspent: {reason}"})

    def _append(self, state: ChainState, kind: str, body: dict[str, Any]) -> None:
        head = state.entries[-1]
        _write(self._path, [*state.entries, seal_entry(kind, body, index=head["index"] + 1, prev=head["digest"])])

    def _check_affordable(self, state: ChainState, epsilon: float, delta: float) -> None:
        if state.over(epsilon, delta):
            spent_epsilon, spent_delta = state.charged()
            error = BudgetExceededError(
                requested_epsilon=epsilon, spent_epsilon=spent_epsilon, budget_epsilon=self._epsilon_budget,
                requested_delta=delta, spent_delta=spent_delta, budget_delta=self._delta_budget)
            logger.warning("privacy ledger %s: refused: %s", self._path, error)
            raise error

    def _state(self) -> ChainState:
        """Read and verify the file, and check that it is this silo's ledger with this budget."""
        state = verify_chain(self._path, read_chain_file(self._path))
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


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # A sidecar file: the ledger itself is replaced on every write, so a lock
    # held on its inode would not exclude the next writer.
    try:
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError as exc:
        raise LedgerMissingError(f"{path}: the privacy ledger's directory is gone. Restore it from backup. "
                                 + NEW_LEDGER_IS_NOT_A_RESET) from exc
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
