"""The privacy ledger: persisted, append-only, budget-enforcing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mor_secure.privacy.ledger import BudgetExceededError, PrivacyLedger, PrivacySpend


def spend(epsilon: float, delta: float = 1e-6, purpose: str = "train:reward-model") -> PrivacySpend:
    return PrivacySpend.now(purpose=purpose, epsilon=epsilon, delta=delta, details={"steps": 10})


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "silo-a" / "privacy_ledger.json"


def test_new_ledger_is_written_with_its_budget(path: Path) -> None:
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta_budget=1e-4)
    assert json.loads(path.read_text()) == {"epsilon_budget": 10.0, "delta_budget": 1e-4, "spends": []}
    assert ledger.spent_epsilon == 0.0
    assert ledger.remaining_epsilon == 10.0
    assert ledger.spends == ()


def test_spends_persist_across_reopen(path: Path) -> None:
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta_budget=1e-4)
    first = spend(2.5, 1e-5, purpose="train:reward-model")
    ledger.record(first)
    ledger.record(spend(1.5, 2e-5, purpose="rr:labels"))

    reopened = PrivacyLedger(path, epsilon_budget=10.0, delta_budget=1e-4)
    assert [s.purpose for s in reopened.spends] == ["train:reward-model", "rr:labels"]
    assert reopened.spends[0] == first
    assert reopened.spent_epsilon == pytest.approx(4.0)
    assert reopened.spent_delta == pytest.approx(3e-5)
    assert reopened.remaining_epsilon == pytest.approx(6.0)
    assert reopened.remaining_delta == pytest.approx(7e-5)


def test_recording_only_appends(path: Path) -> None:
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta_budget=1e-4)
    ledger.record(spend(1.0))
    before = json.loads(path.read_text())["spends"]
    ledger.record(spend(2.0))
    after = json.loads(path.read_text())["spends"]
    assert after[: len(before)] == before
    assert len(after) == 2
    # No temporary files left behind.
    assert {p.name for p in path.parent.iterdir()} == {path.name, path.name + ".lock"}


def test_two_handles_on_one_file_see_each_others_spends(path: Path) -> None:
    a = PrivacyLedger(path, epsilon_budget=5.0, delta_budget=1e-4)
    b = PrivacyLedger(path, epsilon_budget=5.0, delta_budget=1e-4)
    a.record(spend(3.0))
    assert b.spent_epsilon == 3.0
    with pytest.raises(BudgetExceededError):
        b.record(spend(3.0))
    b.record(spend(2.0))
    assert len(a.spends) == 2


def test_over_budget_spend_is_refused_and_file_unchanged(path: Path) -> None:
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta_budget=1e-4)
    ledger.record(spend(7.0, 1e-5))
    before = path.read_bytes()

    with pytest.raises(BudgetExceededError) as info:
        ledger.record(spend(4.0, 1e-5))

    err = info.value
    assert (err.requested_epsilon, err.spent_epsilon, err.budget_epsilon) == (4.0, 7.0, 10.0)
    assert (err.requested_delta, err.spent_delta, err.budget_delta) == (1e-5, 1e-5, 1e-4)
    message = str(err)
    for number in ("epsilon=4", "epsilon=7 of 10", "remaining 3", "delta=1e-05 of 0.0001"):
        assert number in message
    assert "raise the budget in the silo config" in message
    assert path.read_bytes() == before
    assert ledger.spent_epsilon == 7.0


def test_delta_over_budget_is_refused(path: Path) -> None:
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta_budget=1e-5)
    with pytest.raises(BudgetExceededError, match="requested epsilon=1, delta=2e-05"):
        ledger.check_affordable(epsilon=1.0, delta=2e-5)


def test_spend_that_exactly_fits_is_allowed_despite_float_rounding(path: Path) -> None:
    ledger = PrivacyLedger(path, epsilon_budget=0.3, delta_budget=0.0)
    ledger.record(spend(0.1, 0.0))
    ledger.record(spend(0.2, 0.0))  # 0.1 + 0.2 == 0.30000000000000004 in floats
    assert ledger.remaining_epsilon == 0.0
    with pytest.raises(BudgetExceededError):
        ledger.check_affordable(epsilon=1e-6, delta=0.0)


def test_budget_mismatch_on_reopen_is_an_error(path: Path) -> None:
    PrivacyLedger(path, epsilon_budget=10.0, delta_budget=1e-4).record(spend(1.0))
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"created with budget epsilon=10.0, delta=0.0001.*configured with epsilon=20.0"):
        PrivacyLedger(path, epsilon_budget=20.0, delta_budget=1e-4)
    assert path.read_bytes() == before


def test_corrupt_ledger_is_never_replaced(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable privacy ledger"):
        PrivacyLedger(path, epsilon_budget=10.0, delta_budget=1e-4)
    assert path.read_text() == "{not json"


def test_details_that_are_not_json_leave_the_file_untouched(path: Path) -> None:
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta_budget=1e-4)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        ledger.record(PrivacySpend.now(purpose="x", epsilon=1.0, delta=0.0, details={"bad": object()}))
    assert path.read_bytes() == before
    assert {p.name for p in path.parent.iterdir()} == {path.name, path.name + ".lock"}


@pytest.mark.parametrize(
    ("epsilon", "delta", "message"),
    [
        (math.nan, 0.0, "epsilon must be a finite number >= 0"),
        (-0.1, 0.0, "epsilon must be a finite number >= 0"),
        (math.inf, 0.0, "epsilon must be a finite number >= 0"),
        (1.0, math.nan, r"delta must be in \[0, 1\]"),
        (1.0, -1e-9, r"delta must be in \[0, 1\]"),
    ],
)
def test_bad_values_are_rejected(path: Path, epsilon: float, delta: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrivacySpend.now(purpose="x", epsilon=epsilon, delta=delta)
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta_budget=1e-4)
    with pytest.raises(ValueError, match=message):
        ledger.check_affordable(epsilon=epsilon, delta=delta)


@pytest.mark.parametrize(
    ("epsilon_budget", "delta_budget", "message"),
    [
        (math.nan, 1e-4, "epsilon_budget must be a finite number > 0"),
        (0.0, 1e-4, "epsilon_budget must be a finite number > 0"),
        (10.0, 1.0, r"delta_budget must be in \[0, 1\)"),
        (10.0, -1e-4, r"delta_budget must be in \[0, 1\)"),
    ],
)
def test_bad_budgets_are_rejected(path: Path, epsilon_budget: float, delta_budget: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrivacyLedger(path, epsilon_budget=epsilon_budget, delta_budget=delta_budget)
    assert not path.exists()


def test_timestamps_must_be_iso_utc() -> None:
    assert PrivacySpend.now(purpose="x", epsilon=1.0, delta=0.0).timestamp.endswith("+00:00")
    with pytest.raises(ValueError, match="must be in UTC"):
        PrivacySpend(timestamp="2026-01-01T12:00:00+02:00", purpose="x", epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError, match="must be in UTC"):
        PrivacySpend(timestamp="2026-01-01T12:00:00", purpose="x", epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError, match="ISO-8601"):
        PrivacySpend(timestamp="yesterday", purpose="x", epsilon=1.0, delta=0.0)
