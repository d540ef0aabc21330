"""The silo's audit sink: its tamper-evident log, with what each call cost in privacy and the ledger's state.

Every entry the authorizing wrapper writes for a query gets the privacy it
spent (zero: scores and bits of a DP-trained model are post-processing,
silo_agent/service.py) and the ledger's public state at that time (spent
against the lifetime budget), so a reviewer reads budget over time from the
log itself. The ledger summary is re-read at most once a second: it only
changes when a training job of the silo runs.

Serving start and stop are entries too; the start records the policy in
force: every field with the defaults filled in, as YAML, and the SHA-256 of
its canonical JSON (configuration, not data).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import yaml

from mor_secure.audit import AuditLog, SignedCheckpoint
from mor_secure.audit.checkpoints import canonical_json
from mor_secure.policy import SiloPolicy
from mor_secure.wire.messages import LedgerSummary

LEDGER_REFRESH_SECONDS = 1.0
POST_PROCESSING = "scores of a DP-trained model are post-processing: no privacy spent (Dwork & Roth 2014, Prop. 2.1)"


class SiloAuditTrail:
    """`AuditSink` of `mor silo serve` over the silo's `AuditLog`."""

    def __init__(self, log: AuditLog, ledger: Callable[[], LedgerSummary] | None) -> None:
        self.log = log
        self._ledger = ledger
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any] | None] = (-float("inf"), None)

    def _ledger_state(self) -> dict[str, Any] | None:
        if self._ledger is None:
            return None
        with self._lock:
            read_at, state = self._cached
            if time.monotonic() - read_at >= LEDGER_REFRESH_SECONDS:
                state = asdict(self._ledger())
                self._cached = (time.monotonic(), state)
            return state

    def record(self, event: Mapping[str, Any]) -> int:
        privacy = {"epsilon_spent": 0.0, "delta_spent": 0.0, "why": POST_PROCESSING,
                   "ledger": self._ledger_state()}
        return self.log.record({**event, "privacy": privacy})

    def latest_checkpoint(self) -> SignedCheckpoint | None:
        return self.log.latest_checkpoint()

    def serving_started(self, *, silo: str, policy: SiloPolicy, policy_source: str, address: str) -> None:
        """The first entry of a serving run: where, and under which policy (all of it, defaults filled in)."""
        in_force = policy.model_dump(mode="json")
        text = (f"# in force: {policy_source}, with the schema's defaults for what it leaves out\n"
                + yaml.safe_dump(in_force, sort_keys=False))
        self.log.record({"event": "serving_started", "silo": silo, "address": address,
                         "policy_digest": hashlib.sha256(canonical_json(in_force)).hexdigest(), "policy_text": text,
                         "ledger": self._ledger_state()})

    def serving_stopped(self, *, silo: str) -> None:
        self.log.record({"event": "serving_stopped", "silo": silo, "ledger": self._ledger_state()})

    def close(self) -> None:
        self.log.close()
