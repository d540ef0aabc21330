"""The silo's audit sink: its tamper-evident log, with what each call cost in privacy and the ledger's state.

Every entry the authorizing wrapper writes for a query gets the privacy it
spent (zero: answering charges no ledger), why, and the ledger's public
state at that time (spent against the lifetime budget), so a reviewer reads
budget over time from the log itself. The why is the served model's own
privacy report's: only a model trained with DP and real noise is private,
and only then are its scores and bits post-processing of a DP output
(silo_agent/service.py); a model trained without DP or with seeded noise,
or with no report tied to its weights, is said to carry no DP guarantee.
The ledger summary is re-read at most once a second: it only changes when a
training job of the silo runs.

Serving start and stop are entries too; the start records the policy in
force: every field with the defaults filled in, as YAML, and the SHA-256 of
its canonical JSON (configuration, not data), and the served model's privacy
status (`model_privacy`: for a private model, with the unit of its guarantee), which the reviewer's page shows
per silo.
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
from mor_secure.privacy import PrivacyReport
from mor_secure.wire.messages import LedgerSummary

LEDGER_REFRESH_SECONDS = 1.0
POST_PROCESSING = "scores of a DP-trained model are post-processing: no privacy spent (Dwork & Roth 2014, Prop. 2.1)"
# A model that is not private: answering still charges no ledger (0 spent), but its answers inherit no guarantee.
NOT_PRIVATE = ("the served model is NOT differentially private ({why}): no DP guarantee holds for its scores and "
               "bits, and no privacy claim is made for them (answering charges no ledger)")
NO_REPORT = ("the served model has no privacy report tied to its weights: it is not shown to be differentially "
             "private, so no DP guarantee is claimed for its scores and bits (answering charges no ledger)")


def model_privacy(report: PrivacyReport | None) -> dict[str, Any]:
    """What the served model's privacy report says of it, for the log: private or not, the sentence why, and for
    a private one the unit its epsilon protects (image, patient or pair: a per-pair epsilon says nothing of a
    patient with several pairs, and the reviewer's page must not read like a per-patient one).

    Post-processing only protects what the model's training protected: a model
    trained without DP, or with noise anyone knowing the seed can remove, has
    no guarantee for its answers to inherit, so they are never called free of
    privacy cost; nor are those of a model without a report (Describe then
    publishes no privacy claim either).
    """
    if report is None:
        return {"private": False, "why": NO_REPORT}
    if not report.dp_enabled:
        why = "trained without DP: its privacy report says dp_enabled false"
    elif not report.private:
        why = f"its DP-SGD noise was {report.noise!r}: its privacy report says private false"
    else:
        return {"private": True, "why": POST_PROCESSING, "unit": report.privacy_unit}
    return {"private": False, "why": NOT_PRIVATE.format(why=why)}


class SiloAuditTrail:
    """`AuditSink` of `mor silo serve` over the silo's `AuditLog`."""

    def __init__(self, log: AuditLog, ledger: Callable[[], LedgerSummary] | None, *,
                 served_report: PrivacyReport | None) -> None:
        self.log = log
        self._ledger = ledger
        self._model_privacy = model_privacy(served_report)
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
        privacy = {"epsilon_spent": 0.0, "delta_spent": 0.0, "model_private": self._model_privacy["private"],
                   "why": self._model_privacy["why"], "ledger": self._ledger_state()}
        return self.log.record({**event, "privacy": privacy})

    def latest_checkpoint(self) -> SignedCheckpoint | None:
        return self.log.latest_checkpoint()

    @property
    def size(self) -> int:
        return self.log.size

    def serving_started(self, *, silo: str, policy: SiloPolicy, policy_source: str, address: str) -> None:
        """The first entry of a serving run: where, under which policy (all of it, defaults filled in), and whether
        the model it serves is differentially private."""
        in_force = policy.model_dump(mode="json")
        text = (f"# in force: {policy_source}, with the schema's defaults for what it leaves out\n"
                + yaml.safe_dump(in_force, sort_keys=False))
        self.log.record({"event": "serving_started", "silo": silo, "address": address,
                         "policy_digest": hashlib.sha256(canonical_json(in_force)).hexdigest(), "policy_text": text,
                         "model_privacy": self._model_privacy, "ledger": self._ledger_state()})

    def serving_stopped(self, *, silo: str) -> None:
        self.log.record({"event": "serving_stopped", "silo": silo, "ledger": self._ledger_state()})

    def close(self) -> None:
        self.log.close()
