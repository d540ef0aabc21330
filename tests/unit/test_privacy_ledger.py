"""The privacy ledger: explicit creation, a verified hash chain, reserve-then-settle against a fixed budget."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from mor_secure.privacy.ledger import (
    BudgetExceededError,
    LedgerError,
    LedgerExistsError,
    LedgerMismatchError,
    LedgerMissingError,
    LedgerTamperedError,
    PrivacyCharge,
    PrivacyLedger,
    PrivacyUnitMismatchError,
    Reservation,
)

SILO = "hospital-a"
BUDGET = {"epsilon_budget": 10.0, "delta_budget": 1e-4}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "silo-a" / "privacy_ledger.json"


def create(path: Path, **overrides: Any) -> PrivacyLedger:
    return PrivacyLedger.create(path, **{"silo": SILO, **BUDGET, **overrides})


def reopen(path: Path) -> PrivacyLedger:
    return PrivacyLedger(path, silo=SILO, **BUDGET)


def entries(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["entries"]


def digest(entry: dict[str, Any]) -> str:
    """The spec's digest, computed independently of the module: sha256 of canonical JSON without `digest`."""
    body = {k: v for k, v in entry.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def write_entries(path: Path, new: list[dict[str, Any]], *, rechain: bool = False) -> None:
    """Write `new` as the ledger; with `rechain`, recompute index/prev/digest as a forger would."""
    if rechain:
        prev = "0" * 64
        for i, entry in enumerate(new):
            entry.update(index=i, prev=prev)
            entry["digest"] = prev = digest(entry)
    path.write_text(json.dumps({"format": "mor-privacy-ledger/1", "entries": new}, indent=2))


def ledger_with_history(path: Path) -> PrivacyLedger:
    """genesis, reserve A, settle A, reserve B, reserve C (entries 0..4)."""
    ledger = create(path)
    a = ledger.reserve(purpose="train:a", epsilon=2.0, delta=1e-5, details={"steps": 10})
    ledger.settle(a, epsilon=1.5, delta=1e-5, details={"steps": 10, "epsilon": 1.5})
    ledger.reserve(purpose="train:b", epsilon=1.0, delta=1e-6)
    ledger.reserve(purpose="rr:labels", epsilon=0.5, delta=0.0)
    return ledger


def only_ledger_files(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()}


# ---- creation and opening -------------------------------------------------------------------------------


def test_create_writes_a_genesis_and_reopens(path: Path) -> None:
    ledger = create(path)
    raw = json.loads(path.read_text())
    assert raw["format"] == "mor-privacy-ledger/1"
    (genesis,) = raw["entries"]
    assert genesis["index"] == 0 and genesis["kind"] == "genesis" and genesis["prev"] == "0" * 64
    assert (genesis["silo"], genesis["epsilon_budget"], genesis["delta_budget"]) == (SILO, 10.0, 1e-4)
    assert genesis["supersedes"] is None and genesis["created"].endswith("+00:00")
    assert genesis["digest"] == digest(genesis) == ledger.head_digest

    reopened = reopen(path)
    assert (reopened.silo, reopened.epsilon_budget, reopened.delta_budget) == (SILO, 10.0, 1e-4)
    assert reopened.spent_epsilon == 0.0 and reopened.remaining_epsilon == 10.0
    assert reopened.charges == () and reopened.open_reservations == ()
    assert only_ledger_files(path) == {path.name, path.name + ".lock"}


def test_create_refuses_an_existing_ledger(path: Path) -> None:
    ledger_with_history(path)
    before = path.read_bytes()
    with pytest.raises(LedgerExistsError, match="already exists.*force=True") as info:
        create(path, epsilon_budget=50.0)
    assert isinstance(info.value, LedgerError) and isinstance(info.value, ValueError)
    assert isinstance(info.value, FileExistsError)
    assert path.read_bytes() == before
    assert only_ledger_files(path) == {path.name, path.name + ".lock"}


def test_forced_create_keeps_the_old_ledger_and_warns(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old_head = ledger_with_history(path).head_digest
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="mor_secure.privacy.ledger"):
        ledger = create(path, epsilon_budget=5.0, force=True)

    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "discards the record of past spends" in warning.getMessage()
    assert "VOIDS the differential-privacy guarantee" in warning.getMessage()
    (kept,) = [p for p in path.parent.iterdir() if ".superseded-" in p.name]
    assert kept.name.startswith(path.name + ".superseded-") and kept.name.endswith("Z")
    assert kept.read_bytes() == before
    (genesis,) = entries(path)
    assert genesis["supersedes"] == old_head
    assert ledger.epsilon_budget == 5.0 and ledger.spent_epsilon == 0.0


def test_forced_create_refuses_to_supersede_a_ledger_that_does_not_verify(path: Path) -> None:
    ledger_with_history(path)
    tampered = entries(path)
    tampered[1]["epsilon"] = 0.0
    write_entries(path, tampered)
    before = path.read_bytes()
    with pytest.raises(LedgerTamperedError, match="entry 1 "):
        create(path, force=True)
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if ".superseded-" in p.name]


def test_opening_a_missing_ledger_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "workdir" / "privacy_ledger.json"
    with pytest.raises(LedgerMissingError, match=r"Restore it from backup.*mor silo init --config.*never to reset"):
        PrivacyLedger(missing, silo=SILO, **BUDGET)
    assert not missing.parent.exists()

    missing.parent.mkdir()
    with pytest.raises(LedgerMissingError) as info:
        PrivacyLedger(missing, silo=SILO, **BUDGET)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    assert list(missing.parent.iterdir()) == []


def test_a_deleted_ledger_refuses_the_next_reservation(path: Path) -> None:
    ledger = create(path)
    path.unlink()
    with pytest.raises(LedgerMissingError):
        ledger.reserve(purpose="train", epsilon=1.0, delta=0.0)
    assert not path.exists()


@pytest.mark.parametrize(
    ("opened_with", "message"),
    [
        ({"epsilon_budget": 20.0}, r"created with budget epsilon=10.0, delta=0.0001.*configured with epsilon=20.0"),
        ({"delta_budget": 1e-3}, r"delta=0.0001, but this silo is configured with epsilon=10.0, delta=0.001"),
        ({"silo": "bank-b"}, r"belongs to silo 'hospital-a', but the config names silo 'bank-b'"),
    ],
)
def test_budget_or_silo_mismatch_is_refused(path: Path, opened_with: dict[str, Any], message: str) -> None:
    ledger_with_history(path)
    before = path.read_bytes()
    with pytest.raises(LedgerMismatchError, match=message):
        PrivacyLedger(path, **{"silo": SILO, **BUDGET, **opened_with})
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("epsilon_budget", "delta_budget", "silo", "message"),
    [
        (math.nan, 1e-4, SILO, "epsilon_budget must be a finite number > 0"),
        (0.0, 1e-4, SILO, "epsilon_budget must be a finite number > 0"),
        (10.0, 1.0, SILO, r"delta_budget must be in \[0, 1\)"),
        (10.0, -1e-4, SILO, r"delta_budget must be in \[0, 1\)"),
        (10.0, 1e-4, "", "silo must be the silo's non-empty name"),
    ],
)
def test_bad_budgets_are_rejected_before_anything_is_written(
    path: Path, epsilon_budget: float, delta_budget: float, silo: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        PrivacyLedger.create(path, silo=silo, epsilon_budget=epsilon_budget, delta_budget=delta_budget)
    assert not path.parent.exists()


# ---- reserve and settle ---------------------------------------------------------------------------------


def test_reserve_then_settle_charges_the_settled_amount(path: Path) -> None:
    ledger = create(path)
    reservation = ledger.reserve(purpose="train:reward-model", epsilon=3.0, delta=1e-5, details={"target": 3.0})
    assert isinstance(reservation, Reservation) and len(reservation.id) == 32
    assert (reservation.purpose, reservation.epsilon, reservation.delta) == ("train:reward-model", 3.0, 1e-5)
    assert ledger.spent_epsilon == 3.0 and ledger.open_reservations == (reservation.id,)

    ledger.settle(reservation.id, epsilon=2.25, delta=5e-6, details={"epsilon": 2.25, "steps": 7})
    reopened = reopen(path)
    assert reopened.spent_epsilon == 2.25 and reopened.spent_delta == 5e-6
    assert reopened.remaining_epsilon == 7.75 and reopened.remaining_delta == pytest.approx(9.5e-5)
    assert reopened.open_reservations == ()
    assert reopened.charges == (PrivacyCharge(
        reservation_id=reservation.id, timestamp=reservation.timestamp, purpose="train:reward-model",
        epsilon=2.25, delta=5e-6, reserved_epsilon=3.0, reserved_delta=1e-5, settled=True,
        details={"epsilon": 2.25, "steps": 7}),)
    assert [e["kind"] for e in entries(path)] == ["genesis", "reserve", "settle"]


def test_an_unsettled_reservation_stays_charged_after_reopen(path: Path) -> None:
    ledger = create(path)
    settled = ledger.reserve(purpose="train:one", epsilon=2.0, delta=1e-5)
    ledger.settle(settled, epsilon=1.0, delta=1e-6)
    crashed = ledger.reserve(purpose="train:crashed", epsilon=4.0, delta=2e-5, details={"run": 2})

    reopened = reopen(path)
    assert reopened.open_reservations == (crashed.id,)
    assert reopened.spent_epsilon == 5.0 and reopened.spent_delta == pytest.approx(2.1e-5)
    charge = reopened.charges[1]
    assert (charge.settled, charge.epsilon, charge.delta, charge.details) == (False, 4.0, 2e-5, {"run": 2})
    with pytest.raises(BudgetExceededError):
        reopened.reserve(purpose="train:three", epsilon=5.5, delta=0.0)


def test_two_handles_on_one_file_see_each_others_charges(path: Path) -> None:
    a = create(path, epsilon_budget=5.0)
    b = PrivacyLedger(path, silo=SILO, epsilon_budget=5.0, delta_budget=1e-4)
    r = a.reserve(purpose="x", epsilon=3.0, delta=0.0)
    assert b.spent_epsilon == 3.0
    with pytest.raises(BudgetExceededError):
        b.reserve(purpose="y", epsilon=3.0, delta=0.0)
    b.settle(r, epsilon=1.0, delta=0.0)
    b.reserve(purpose="y", epsilon=3.0, delta=0.0)
    assert len(a.charges) == 2 and a.spent_epsilon == 4.0


@pytest.mark.parametrize(("epsilon", "delta"), [(2.0000001, 1e-5), (2.0, 1.1e-5)])
def test_settling_above_the_reservation_is_refused(path: Path, epsilon: float, delta: float) -> None:
    ledger = create(path)
    r = ledger.reserve(purpose="x", epsilon=2.0, delta=1e-5)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="may not exceed its reservation"):
        ledger.settle(r, epsilon=epsilon, delta=delta)
    assert path.read_bytes() == before and ledger.open_reservations == (r.id,)


def test_a_reservation_is_settled_once_and_only_if_it_exists(path: Path) -> None:
    ledger = create(path)
    r = ledger.reserve(purpose="x", epsilon=2.0, delta=0.0)
    ledger.settle(r, epsilon=1.0, delta=0.0)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="already settled"):
        ledger.settle(r, epsilon=0.5, delta=0.0)
    with pytest.raises(ValueError, match="no reservation 'f00' in this ledger"):
        ledger.settle("f00", epsilon=0.5, delta=0.0)
    with pytest.raises(TypeError, match="takes a Reservation or its id"):
        ledger.settle(3, epsilon=0.5, delta=0.0)  # type: ignore[arg-type]
    assert path.read_bytes() == before and ledger.spent_epsilon == 1.0


def test_over_budget_reservation_is_refused_and_the_file_is_unchanged(path: Path) -> None:
    ledger = create(path)
    ledger.reserve(purpose="x", epsilon=7.0, delta=1e-5)
    before = path.read_bytes()

    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve(purpose="y", epsilon=4.0, delta=1e-5)

    err = info.value
    assert (err.requested_epsilon, err.spent_epsilon, err.budget_epsilon) == (4.0, 7.0, 10.0)
    assert (err.requested_delta, err.spent_delta, err.budget_delta) == (1e-5, 1e-5, 1e-4)
    message = str(err)
    for number in ("epsilon=4", "epsilon=7 of 10", "remaining 3", "delta=1e-05 of 0.0001"):
        assert number in message
    assert "fixed when the ledger is created" in message and "raise the budget" not in message
    assert path.read_bytes() == before
    assert only_ledger_files(path) == {path.name, path.name + ".lock"}


def test_delta_over_budget_is_refused(path: Path) -> None:
    ledger = create(path, delta_budget=1e-5)
    with pytest.raises(BudgetExceededError, match="requested epsilon=1, delta=2e-05"):
        ledger.check_affordable(epsilon=1.0, delta=2e-5)
    before = path.read_bytes()
    with pytest.raises(BudgetExceededError):
        ledger.reserve(purpose="x", epsilon=1.0, delta=2e-5)
    assert path.read_bytes() == before


def test_a_reservation_that_exactly_fits_is_allowed_despite_float_rounding(path: Path) -> None:
    ledger = create(path, epsilon_budget=0.3, delta_budget=0.0)
    ledger.reserve(purpose="a", epsilon=0.1, delta=0.0)
    ledger.reserve(purpose="b", epsilon=0.2, delta=0.0)  # 0.1 + 0.2 == 0.30000000000000004 in floats
    assert ledger.remaining_epsilon == 0.0
    reopen_exact = PrivacyLedger(path, silo=SILO, epsilon_budget=0.3, delta_budget=0.0)  # still verifies
    with pytest.raises(BudgetExceededError):
        reopen_exact.check_affordable(epsilon=1e-6, delta=0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": math.nan}, "epsilon must be a finite number >= 0"),
        ({"epsilon": -0.1}, "epsilon must be a finite number >= 0"),
        ({"epsilon": math.inf}, "epsilon must be a finite number >= 0"),
        ({"epsilon": True}, "epsilon must be a finite number >= 0"),
        ({"delta": math.nan}, r"delta must be in \[0, 1\]"),
        ({"delta": -1e-9}, r"delta must be in \[0, 1\]"),
        ({"delta": 1.5}, r"delta must be in \[0, 1\]"),
        ({"purpose": " "}, "purpose must be a non-empty string"),
        ({"details": {"bad": object()}}, "details must be JSON-serialisable"),
        ({"details": {"x": math.nan}}, "details must be JSON-serialisable"),
        ({"details": ["not", "a", "dict"]}, "details must be a dict"),
    ],
)
def test_bad_inputs_fail_before_the_file_is_touched(path: Path, kwargs: dict[str, Any], message: str) -> None:
    ledger = create(path)
    r = ledger.reserve(purpose="x", epsilon=1.0, delta=1e-6)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message):
        ledger.reserve(**{"purpose": "y", "epsilon": 1.0, "delta": 0.0, **kwargs})
    settle_kwargs = {k: v for k, v in kwargs.items() if k != "purpose"}
    if settle_kwargs:
        with pytest.raises(ValueError, match=message):
            ledger.settle(r, **{"epsilon": 0.5, "delta": 0.0, **settle_kwargs})
    if "details" not in kwargs and "purpose" not in kwargs:
        with pytest.raises(ValueError, match=message):
            ledger.check_affordable(**{"epsilon": 1.0, "delta": 0.0, **kwargs})
    assert path.read_bytes() == before
    assert only_ledger_files(path) == {path.name, path.name + ".lock"}


def test_each_entry_links_to_the_one_before(path: Path) -> None:
    ledger = ledger_with_history(path)
    chain = entries(path)
    assert [e["index"] for e in chain] == [0, 1, 2, 3, 4]
    assert [e["kind"] for e in chain] == ["genesis", "reserve", "settle", "reserve", "reserve"]
    for before, entry in zip(chain, chain[1:]):
        assert entry["prev"] == before["digest"]
    assert all(e["digest"] == digest(e) for e in chain)
    assert ledger.head_digest == chain[-1]["digest"]
    assert chain[2]["reservation"] == chain[1]["id"]


# ---- tampering ------------------------------------------------------------------------------------------


def _flip_value(chain: list[dict[str, Any]]) -> int:
    chain[3]["epsilon"] = 0.001  # make a big spend look small
    return 3


def _delete_middle(chain: list[dict[str, Any]]) -> int:
    del chain[2]
    return 2


def _swap(chain: list[dict[str, Any]]) -> int:
    chain[3], chain[4] = chain[4], chain[3]
    return 3


def _insert_copy(chain: list[dict[str, Any]]) -> int:
    chain.insert(2, dict(chain[1]))
    return 2


def _edit_genesis_budget(chain: list[dict[str, Any]]) -> int:
    chain[0]["epsilon_budget"] = 100.0
    return 0


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (_flip_value, "does not match its digest"),
        (_delete_middle, "says it is entry 3"),
        (_swap, "says it is entry 4"),
        (_insert_copy, "says it is entry 1"),
        (_edit_genesis_budget, "does not match its digest"),
    ],
)
def test_an_edited_chain_is_refused_at_the_first_bad_entry(path: Path, tamper: Any, problem: str) -> None:
    ledger_with_history(path)
    chain = entries(path)
    index = tamper(chain)
    write_entries(path, chain)
    before = path.read_bytes()

    with pytest.raises(LedgerTamperedError, match=f"entry {index} {problem}.*Restore the ledger from backup") as info:
        reopen(path)
    assert info.value.index == index
    assert path.read_bytes() == before


def test_a_tampered_ledger_refuses_reservations_and_is_left_as_is(path: Path) -> None:
    ledger = ledger_with_history(path)
    chain = entries(path)
    _flip_value(chain)
    write_entries(path, chain)
    before = path.read_bytes()
    with pytest.raises(LedgerTamperedError, match="entry 3 "):
        ledger.reserve(purpose="x", epsilon=0.1, delta=0.0)
    with pytest.raises(LedgerTamperedError):
        _ = ledger.spent_epsilon
    assert path.read_bytes() == before


def _settle_missing(chain: list[dict[str, Any]]) -> tuple[int, str]:
    chain[2]["reservation"] = "0" * 32
    return 2, "settles reservation '0{32}', which no earlier entry reserved"


def _settle_twice(chain: list[dict[str, Any]]) -> tuple[int, str]:
    chain.insert(3, dict(chain[2]))
    return 3, "a second time"


def _settle_above_reservation(chain: list[dict[str, Any]]) -> tuple[int, str]:
    chain[2]["epsilon"] = 2.5  # reserved 2.0
    return 2, "for more than it reserved"


def _settle_before_reserve(chain: list[dict[str, Any]]) -> tuple[int, str]:
    chain[1], chain[2] = chain[2], chain[1]
    return 1, "which no earlier entry reserved"


def _over_budget(chain: list[dict[str, Any]]) -> tuple[int, str]:
    chain[4]["epsilon"] = 9.0  # 1.5 + 1.0 + 9.0 > 10
    return 4, "takes the charged total over the budget"


@pytest.mark.parametrize(
    "forge", [_settle_missing, _settle_twice, _settle_above_reservation, _settle_before_reserve, _over_budget]
)
def test_a_rehashed_chain_with_bad_bookkeeping_is_refused(path: Path, forge: Any) -> None:
    """Even with index, prev and digest recomputed, the entries must make sense as a ledger."""
    ledger_with_history(path)
    chain = entries(path)
    index, problem = forge(chain)
    write_entries(path, chain, rechain=True)
    with pytest.raises(LedgerTamperedError, match=f"entry {index} .*{problem}") as info:
        reopen(path)
    assert info.value.index == index


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "is not valid JSON"),
        ('{"format": "mor-privacy-ledger/1", "entries": [{"x": NaN}]}', "is not valid JSON"),
        ('{"format": "mor-privacy-ledger/1", "format": "mor-privacy-ledger/1", "entries": []}', "duplicate key"),
        ('{"epsilon_budget": 10.0, "delta_budget": 0.0001, "spends": []}', "is not a mor-privacy-ledger/1 file"),
        ('{"format": "mor-privacy-ledger/1", "entries": []}', "has no entries"),
    ],
)
def test_a_file_that_is_not_a_ledger_is_refused_and_never_replaced(path: Path, text: str, problem: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(LedgerTamperedError, match=problem) as info:
        reopen(path)
    assert info.value.index is None
    assert path.read_text() == text


def test_an_entry_with_an_unexpected_field_is_refused(path: Path) -> None:
    ledger_with_history(path)
    chain = entries(path)
    chain[1]["note"] = "harmless?"
    write_entries(path, chain, rechain=True)
    with pytest.raises(LedgerTamperedError, match=r"entry 1 has fields \[.*'note'"):
        reopen(path)


def test_release_settles_an_unused_reservation_at_zero(tmp_path: Path) -> None:
    ledger = PrivacyLedger.create(tmp_path / "l.json", silo="s", epsilon_budget=1.0, delta_budget=1e-5)
    reservation = ledger.reserve(purpose="train", epsilon=0.8, delta=1e-6)
    ledger.release(reservation, reason="config error")
    (charge,) = ledger.charges
    assert charge.settled and (charge.epsilon, charge.delta) == (0.0, 0.0)
    assert charge.details == {"outcome": "released unspent: config error"}
    assert ledger.remaining_epsilon == 1.0
    with pytest.raises(ValueError, match="already settled"):
        ledger.release(reservation, reason="twice")


# ---- one ledger, one privacy unit --------------------------------------------------------------------------


def test_a_charge_over_another_privacy_unit_is_refused_and_the_file_is_unchanged(path: Path) -> None:
    """Per-pair and per-patient epsilons do not add up to one guarantee: the ledger keeps the unit of its charges."""
    ledger = create(path)
    ledger.reserve(purpose="train:a", epsilon=2.0, delta=1e-6, details={"privacy_unit": "image"})
    before = path.read_bytes()
    with pytest.raises(PrivacyUnitMismatchError,
                       match=r"per 'pair', but its earlier charges are per 'image'.*train per image .*"
                             r"dp.privacy_unit: image"):
        ledger.reserve(purpose="train:b", epsilon=2.0, delta=1e-6, details={"privacy_unit": "pair"})
    assert path.read_bytes() == before
    ledger.reserve(purpose="rr:labels", epsilon=1.0, delta=0.0)  # names no unit: nothing to compare
    ledger.reserve(purpose="train:d", epsilon=2.0, delta=1e-6, details={"privacy_unit": "image"})
    assert [c.privacy_unit for c in reopen(path).charges] == ["image", None, "image"]


def test_a_per_patient_charge_on_a_ledger_of_per_image_charges_is_refused(path: Path) -> None:
    """Both are privacy_unit image (one clipped gradient per unit); a patient with k images was protected at k x
    epsilon by a per-image run, so the two sums are no one guarantee: guarantee_unit tells them apart."""
    ledger = create(path)
    ledger.reserve(purpose="train:a", epsilon=2.0, delta=1e-6, details={"privacy_unit": "image",
                                                                      "guarantee_unit": "image"})
    with pytest.raises(PrivacyUnitMismatchError, match=r"per 'patient', but its earlier charges are per 'image'"):
        ledger.reserve(purpose="train:b", epsilon=2.0, delta=1e-6, details={"privacy_unit": "image",
                                                                          "guarantee_unit": "patient"})
    ledger.reserve(purpose="train:c", epsilon=2.0, delta=1e-6, details={"privacy_unit": "image"})  # image: as before
    assert [c.privacy_unit for c in reopen(path).charges] == ["image", "image"]


def test_a_reservation_released_unspent_does_not_fix_the_ledgers_unit(path: Path) -> None:
    """A run refused before its first noisy step released nothing; fixing its config must stay possible."""
    ledger = create(path)
    ledger.release(ledger.reserve(purpose="train:a", epsilon=2.0, delta=1e-6, details={"privacy_unit": "pair"}),
                   reason="config error")
    ledger.reserve(purpose="train:b", epsilon=2.0, delta=1e-6, details={"privacy_unit": "image"})
    assert [c.privacy_unit for c in ledger.charges] == ["pair", "image"]


# ---- charges recorded before guarantee_unit ---------------------------------------------------------------------

# What `mor silo train` reserved before data.unit existed: per unit, without saying whether images or patients.
EARLIER_DP_SGD = {"mechanism": "dp-sgd", "privacy_unit": "image", "noise": "os-entropy"}


def add_a_charge_from_before_data_unit(path: Path) -> None:
    """Append to the ledger at `path` the reserve and settle entries of such a run."""
    old = entries(path)
    reserve = {"kind": "reserve", "id": "earlier-run", "timestamp": "2026-11-30T00:00:00+00:00",
               "purpose": "train:reward-model:small_cnn", "epsilon": 4.0, "delta": 1e-6, "details": EARLIER_DP_SGD}
    settle = {"kind": "settle", "reservation": "earlier-run", "timestamp": "2026-11-30T00:10:00+00:00",
              "epsilon": 3.9, "delta": 1e-6, "details": {}}
    write_entries(path, [*old, reserve, settle], rechain=True)


def with_a_charge_from_before_data_unit(path: Path) -> PrivacyLedger:
    create(path)
    add_a_charge_from_before_data_unit(path)
    return reopen(path)


@pytest.mark.parametrize("unit", ["image", "patient"])
def test_an_earlier_per_unit_charge_is_undeclared_and_no_unit_may_follow_it_until_declared(path: Path,
                                                                                          unit: str) -> None:
    """Per patient if the rows named a unit_id, else per image: neither sum would be one guarantee if guessed."""
    ledger = with_a_charge_from_before_data_unit(path)
    assert [c.privacy_unit for c in ledger.charges] == ["image or patient (recorded before data.unit; undeclared)"]
    before = path.read_bytes()
    for new_unit in ("image", "patient", "pair"):
        with pytest.raises(PrivacyUnitMismatchError, match="--declare-earlier-unit patient"):
            ledger.reserve(purpose="train:b", epsilon=1.0, delta=1e-6,
                           details={"privacy_unit": "image", "guarantee_unit": new_unit})
    assert path.read_bytes() == before
    ledger.declare_earlier_unit(unit)
    assert [c.privacy_unit for c in reopen(path).charges] == [unit]
    other = {"image": "patient", "patient": "image"}[unit]
    with pytest.raises(PrivacyUnitMismatchError, match=f"per '{other}', but its earlier charges are per '{unit}'"):
        ledger.reserve(purpose="train:b", epsilon=1.0, delta=1e-6,
                       details={**EARLIER_DP_SGD, "guarantee_unit": other})
    ledger.reserve(purpose="train:c", epsilon=1.0, delta=1e-6, details={**EARLIER_DP_SGD, "guarantee_unit": unit})
    assert [c.privacy_unit for c in reopen(path).charges] == [unit, unit]
    with pytest.raises(ValueError, match=f"declared already \\({unit}\\).*never changed"):
        ledger.declare_earlier_unit(other)


def test_a_declaration_is_refused_where_every_charge_names_its_unit_and_a_forged_second_one_is_caught(
        path: Path) -> None:
    ledger = create(path)
    ledger.reserve(purpose="train:a", epsilon=1.0, delta=1e-6, details={**EARLIER_DP_SGD, "guarantee_unit": "image"})
    with pytest.raises(ValueError, match="names its unit already; there is nothing to declare"):
        ledger.declare_earlier_unit("patient")
    with pytest.raises(ValueError, match="one of image, patient, got 'pair'"):
        with_a_charge_from_before_data_unit(path.parent / "other.json").declare_earlier_unit("pair")
    ledger = with_a_charge_from_before_data_unit(path.parent / "third.json")
    ledger.declare_earlier_unit("patient")
    forged = entries(ledger.path)
    write_entries(ledger.path, [*forged, {**forged[-1], "unit": "image"}], rechain=True)
    with pytest.raises(LedgerTamperedError, match="entry 4 declares unit 'image': declare_unit names image or "
                                                  "patient, once"):
        _ = reopen(ledger.path).charges


@pytest.mark.parametrize("details", [EARLIER_DP_SGD, {**EARLIER_DP_SGD, "guarantee_unit": None},
                                     {**EARLIER_DP_SGD, "guarantee_unit": "Patient"},
                                     {**EARLIER_DP_SGD, "privacy_unit": "pair", "guarantee_unit": "patient"},
                                     {**EARLIER_DP_SGD, "privacy_unit": None, "guarantee_unit": "image"}])
def test_a_new_dp_sgd_charge_must_say_what_one_unit_of_its_guarantee_is(path: Path, details: dict) -> None:
    ledger = create(path)
    with pytest.raises(ValueError, match="must say what one unit of its guarantee is"):
        ledger.reserve(purpose="train:a", epsilon=1.0, delta=1e-6, details=details)
    assert ledger.charges == ()


def test_a_declaration_against_the_unit_of_later_charges_is_refused(path: Path) -> None:
    """Code between data.unit and declarations read earlier charges as per image and added per-image ones."""
    create(path)
    add_a_charge_from_before_data_unit(path)
    old = entries(path)
    later = {"kind": "reserve", "id": "later-run", "timestamp": "2026-12-02T00:00:00+00:00", "purpose": "train:b",
             "epsilon": 1.0, "delta": 1e-6, "details": {**EARLIER_DP_SGD, "guarantee_unit": "image"}}
    write_entries(path, [*old, later], rechain=True)
    ledger = reopen(path)
    with pytest.raises(ValueError, match="per image, not patient: declare image if the earlier ones"):
        ledger.declare_earlier_unit("patient")
    ledger.declare_earlier_unit("image")
    assert [c.privacy_unit for c in reopen(path).charges] == ["image", "image"]
