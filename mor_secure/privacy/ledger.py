"""Persisted per-silo privacy ledger: every (epsilon, delta) a silo spends, against a fixed budget.

The ledger is a small JSON file::

    {"epsilon_budget": 10.0, "delta_budget": 1e-4, "spends": [{...}, ...]}

It is the single source of truth: every read goes to the file, so several
handles (threads, processes) on one path see each other's spends. Writers hold
an exclusive `flock` on a sidecar ``<name>.lock`` file, re-read the ledger,
check the budget and append; the new file is written to a temporary file in the
same directory, fsynced and moved into place with `os.replace`, so a crash
leaves either the old or the new ledger, never half of one. Spends are only
ever appended: nothing here rewrites or removes one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Relative slack when comparing summed spends with a budget, so that float
# rounding of a sum (0.1 + 0.2 > 0.3) cannot refuse a spend that fits exactly.
_BUDGET_RTOL = 1e-9


@dataclass(frozen=True)
class PrivacySpend:
    """One charge to the ledger: what was spent, when, and for what.

    `details` holds JSON-serialisable facts about the mechanism (for training,
    the privacy report: noise multiplier, sample rate, steps, ...), so that an
    auditor can recompute the epsilon.
    """

    timestamp: str
    purpose: str
    epsilon: float
    delta: float
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            stamp = datetime.fromisoformat(self.timestamp)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"timestamp must be ISO-8601, got {self.timestamp!r}") from exc
        if stamp.utcoffset() != timedelta(0):
            raise ValueError(f"timestamp must be in UTC (e.g. '...+00:00'), got {self.timestamp!r}")
        if not isinstance(self.purpose, str) or not self.purpose.strip():
            raise ValueError("purpose must be a non-empty string saying what the spend was for")
        _check_epsilon(self.epsilon, name="epsilon")
        _check_delta(self.delta, name="delta")
        if not isinstance(self.details, dict):
            raise ValueError(f"details must be a dict, got {type(self.details).__name__}")

    @classmethod
    def now(
        cls, *, purpose: str, epsilon: float, delta: float, details: dict[str, Any] | None = None
    ) -> PrivacySpend:
        """A spend stamped with the current UTC time."""
        return cls(
            timestamp=datetime.now(timezone.utc).isoformat(),
            purpose=purpose,
            epsilon=epsilon,
            delta=delta,
            details=dict(details or {}),
        )


class BudgetExceededError(RuntimeError):
    """A spend was refused because it would take the ledger over its budget.

    Carries every number, so a caller (e.g. an RPC handler answering
    RESOURCE_EXHAUSTED) can report them without parsing the message.
    """

    def __init__(
        self,
        *,
        requested_epsilon: float,
        spent_epsilon: float,
        budget_epsilon: float,
        requested_delta: float,
        spent_delta: float,
        budget_delta: float,
    ) -> None:
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
            "Lower the target epsilon/delta of this request, or, if the data owner agrees, "
            "raise the budget in the silo config and in the ledger file together."
        )


class PrivacyLedger:
    """Append-only record of a silo's privacy spends against a fixed (epsilon, delta) budget.

    Spends compose by basic sequential composition: epsilons add and deltas
    add (Dwork & Roth 2014, Thm 3.16). This is conservative — advanced or
    numerical composition of the whole history would give a smaller total —
    but it holds for any mix of mechanisms (DP-SGD runs, randomized response),
    which is what a ledger of heterogeneous spends needs.
    """

    def __init__(self, path: str | Path, *, epsilon_budget: float, delta_budget: float) -> None:
        if not (math.isfinite(epsilon_budget) and epsilon_budget > 0):
            raise ValueError(f"epsilon_budget must be a finite number > 0, got {epsilon_budget!r}")
        if not (0 <= delta_budget < 1):
            raise ValueError(f"delta_budget must be in [0, 1), got {delta_budget!r}")
        self._path = Path(path)
        self._epsilon_budget = float(epsilon_budget)
        self._delta_budget = float(delta_budget)
        with self._locked():
            if self._path.exists():
                self._load()  # checks that the stored budget is ours
            else:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._write([])

    @property
    def path(self) -> Path:
        return self._path

    @property
    def epsilon_budget(self) -> float:
        return self._epsilon_budget

    @property
    def delta_budget(self) -> float:
        return self._delta_budget

    @property
    def spends(self) -> tuple[PrivacySpend, ...]:
        return tuple(self._load())

    @property
    def spent_epsilon(self) -> float:
        """Sum of all recorded epsilons (basic composition; conservative)."""
        return math.fsum(s.epsilon for s in self._load())

    @property
    def spent_delta(self) -> float:
        """Sum of all recorded deltas (basic composition; conservative)."""
        return math.fsum(s.delta for s in self._load())

    @property
    def remaining_epsilon(self) -> float:
        return max(self._epsilon_budget - self.spent_epsilon, 0.0)

    @property
    def remaining_delta(self) -> float:
        return max(self._delta_budget - self.spent_delta, 0.0)

    def check_affordable(self, *, epsilon: float, delta: float) -> None:
        """Raise `BudgetExceededError` unless a spend of (epsilon, delta) fits the remaining budget."""
        _check_epsilon(epsilon, name="epsilon")
        _check_delta(delta, name="delta")
        self._check_affordable(self._load(), epsilon=epsilon, delta=delta)

    def record(self, spend: PrivacySpend) -> None:
        """Append `spend` and persist it, or raise `BudgetExceededError` and leave the file untouched."""
        if not isinstance(spend, PrivacySpend):
            raise TypeError(f"record() takes a PrivacySpend, got {type(spend).__name__}")
        with self._locked():
            spends = self._load()
            self._check_affordable(spends, epsilon=spend.epsilon, delta=spend.delta)
            self._write([*spends, spend])
        logger.info(
            "privacy ledger %s: recorded %s epsilon=%g delta=%g", self._path, spend.purpose, spend.epsilon, spend.delta
        )

    def _check_affordable(self, spends: list[PrivacySpend], *, epsilon: float, delta: float) -> None:
        spent_epsilon = math.fsum(s.epsilon for s in spends)
        spent_delta = math.fsum(s.delta for s in spends)
        if spent_epsilon + epsilon > self._epsilon_budget * (1 + _BUDGET_RTOL) or (
            spent_delta + delta > self._delta_budget * (1 + _BUDGET_RTOL)
        ):
            error = BudgetExceededError(
                requested_epsilon=epsilon,
                spent_epsilon=spent_epsilon,
                budget_epsilon=self._epsilon_budget,
                requested_delta=delta,
                spent_delta=spent_delta,
                budget_delta=self._delta_budget,
            )
            logger.warning("privacy ledger %s: refused: %s", self._path, error)
            raise error

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # A sidecar file: the ledger itself is replaced on every write, so a
        # lock held on its inode would not exclude the next writer.
        lock_path = self._path.with_name(self._path.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _load(self) -> list[PrivacySpend]:
        try:
            raw = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ValueError(
                f"{self._path}: privacy ledger has disappeared; restore it from backup "
                "(never start a new one: that would reset the budget)"
            ) from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self._path}: unreadable privacy ledger ({exc}); restore it from backup") from exc
        if not isinstance(raw, dict) or set(raw) != {"epsilon_budget", "delta_budget", "spends"}:
            raise ValueError(
                f"{self._path}: not a privacy ledger (expected keys epsilon_budget, delta_budget, spends)"
            )
        if (raw["epsilon_budget"], raw["delta_budget"]) != (self._epsilon_budget, self._delta_budget):
            raise ValueError(
                f"{self._path}: privacy ledger was created with budget epsilon={raw['epsilon_budget']}, "
                f"delta={raw['delta_budget']}, but this silo is configured with epsilon={self._epsilon_budget}, "
                f"delta={self._delta_budget}. A ledger's budget is fixed when it is created so that editing a "
                "config cannot silently change it: make the config match the ledger, or, if the data owner "
                "agreed to a new budget, change it in both places."
            )
        try:
            return [PrivacySpend(**entry) for entry in raw["spends"]]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self._path}: invalid spend in privacy ledger: {exc}") from exc

    def _write(self, spends: list[PrivacySpend]) -> None:
        # Serialise first: a spend whose details are not JSON fails here, before any file is touched.
        text = json.dumps(
            {
                "epsilon_budget": self._epsilon_budget,
                "delta_budget": self._delta_budget,
                "spends": [asdict(s) for s in spends],
            },
            indent=2,
            allow_nan=False,
        )
        fd, tmp_name = tempfile.mkstemp(prefix=self._path.name + ".", suffix=".tmp", dir=self._path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as tmp:
                tmp.write(text)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, self._path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        # Make the rename itself durable.
        dir_fd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _check_epsilon(epsilon: float, *, name: str) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (
        math.isfinite(epsilon) and epsilon >= 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {epsilon!r}")


def _check_delta(delta: float, *, name: str) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 <= delta <= 1):
        raise ValueError(f"{name} must be in [0, 1], got {delta!r}")
