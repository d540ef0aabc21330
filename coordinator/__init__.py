"""The coordinator role: reference policy, (later) router, GRPO and evaluation.

Imports `mor_secure` only; it never imports `silo_agent` (the roles meet
through the wire contract).
"""
