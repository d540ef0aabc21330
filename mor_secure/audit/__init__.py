"""Each party's tamper-evident record of every call: the log, its checks, and the reviewer's report."""

from .checkpoints import CheckpointSigner, SignedCheckpoint
from .log import AuditLog
from .store import AuditLogError, read_log

__all__ = ["AuditLog", "AuditLogError", "CheckpointSigner", "SignedCheckpoint", "read_log"]
