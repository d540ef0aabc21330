"""Recording every call a party serves: the audit sink interface's implementations."""

from .jsonl_sink import JsonlAuditSink

__all__ = ["JsonlAuditSink"]
