"""The coordinator's own audit log: every call it makes to a silo, and every scoring round.

Calls are recorded by the channel itself (mor_secure/transport/client_audit.py);
this module opens the log for a networked pool (once per process and path,
closed with a final signed checkpoint at exit) and writes one entry per
scoring round of calibration and GRPO: the round id every request of the
round carries, the silos asked and those that answered, the digest of the
requests sent to each silo (the same digests the call entries and the
silos' logs hold), the digest of the router weights sent to each silo, and the router's mean
weight per silo and question kind over the rows those weights scored
(aggregates of the coordinator's own routing, never a silo's score; the
fusion leaves out a round that failed or was abandoned, and orphan rows).
"""

from __future__ import annotations

import atexit
import hashlib
import secrets
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mor_secure.audit import AuditLog
from mor_secure.audit.checkpoints import canonical_json
from mor_secure.pki.kits import CertKit
from mor_secure.transport.authorization import AuditSink
from mor_secure.wire import serde
from mor_secure.wire.messages import BitsRequest, ScoreRequest, SecureScoreRequest

_open_logs: dict[Path, AuditLog] = {}
_lock = threading.Lock()


def coordinator_log(path: str | Path, kit: CertKit) -> AuditLog:
    """The coordinator's log at `path`, opened once per process (closed, with a final checkpoint, at exit)."""
    path = Path(path).resolve()
    with _lock:
        log = _open_logs.get(path)
        if log is None:
            log = _open_logs[path] = AuditLog.for_kit(path, kit)
            atexit.register(log.close)
        return log


def close_coordinator_logs() -> None:
    """Close every coordinator log this process opened (a final checkpoint each); they reopen on next use."""
    with _lock:
        for log in _open_logs.values():
            log.close()
        _open_logs.clear()


def new_round_id() -> str:
    """A fresh, unguessable round id (128 bits): the same for every request of one round."""
    return secrets.token_hex(16)


Request = ScoreRequest | BitsRequest | SecureScoreRequest
_TO_PROTO = {ScoreRequest: serde.score_request_to_proto, BitsRequest: serde.bits_request_to_proto,
             SecureScoreRequest: serde.secure_score_request_to_proto}


def request_digest(request: Request) -> str:
    """SHA-256 of the request as it goes on the wire (what both parties' call entries record)."""
    return hashlib.sha256(_TO_PROTO[type(request)](request).SerializeToString()).hexdigest()


def _items(request: Request) -> int:
    if isinstance(request, SecureScoreRequest):
        return len(request.score.rows)
    return len(request.rows if isinstance(request, ScoreRequest) else request.pairs)


def record_round(audit: AuditSink, *, stage: str, round_id: str, objective: str, asked: Sequence[str],
                 answered: Sequence[str], requests: Mapping[str, Sequence[Request]],
                 weights: torch.Tensor | None = None, columns: Sequence[str] | None = None,
                 kinds: Sequence[str | None] | None = None, method: str = "") -> None:
    """One entry for one scoring round (see the module docstring).

    `asked` are the silos the round was sent to and `requests` what each was
    sent (a silo's copy carries its own weights); `weights` is [N, K] with
    one column per silo of `columns` (default `asked`), of which the entry
    keeps the asked silos' only.
    """
    digests = {silo: [request_digest(r) for r in sent] for silo, sent in requests.items()}
    any_silo = next(iter(requests.values()), ())
    event = {"event": "round", "stage": stage, "method": method, "round_id": round_id, "objective": objective,
             "asked": list(asked), "answered": list(answered), "requests": digests,
             "items": sum(_items(r) for r in any_silo),
             "items_digest": hashlib.sha256(canonical_json(digests)).hexdigest()}
    if weights is not None:
        weights = weights.detach().float().cpu()
        column = {silo: k for k, silo in enumerate(asked if columns is None else columns)}
        event["weights_digest"] = {silo: hashlib.sha256(weights[:, column[silo]].contiguous().numpy().tobytes()
                                                        ).hexdigest() for silo in asked}
        if kinds is not None and len(kinds) == weights.shape[0]:
            event["mean_weight"] = _mean_weight_by_kind(weights, {silo: column[silo] for silo in asked}, kinds)
    audit.record(event)


def _mean_weight_by_kind(weights: torch.Tensor, columns: Mapping[str, int],
                         kinds: Sequence[str | None]) -> dict[str, dict[str, list[float]]]:
    """silo -> question kind -> [mean weight, rows], for each silo's column of `weights` (rows of kind None,
    whose weights are not the router's, left out)."""
    table: dict[str, dict[str, list[float]]] = {}
    for silo, k in columns.items():
        table[silo] = {}
        for kind in sorted(set(kinds) - {None}):
            rows = torch.tensor([x == kind for x in kinds])
            table[silo][kind] = [round(weights[rows, k].mean().item(), 6), int(rows.sum())]
    return table
