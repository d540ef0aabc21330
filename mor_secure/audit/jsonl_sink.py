"""An append-only JSON-lines audit sink: one line per decision, flushed and fsynced as it is written.

It records what the transport's authorizing wrapper decides (caller, RPC,
decision, status, reason, latency), never request contents. It is plain
text, so not tamper-evident: the Merkle-tree log of the audit work replaces
it behind the same `record(event)` interface.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class JsonlAuditSink:
    """Appends each event as one JSON line to `path` (created if missing, never truncated)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._handle = self.path.open("a", encoding="utf-8")

    def record(self, event: Mapping[str, Any]) -> None:
        line = json.dumps(dict(event), sort_keys=True, default=str)
        with self._lock:
            self._handle.write(line + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        with self._lock:
            self._handle.close()
