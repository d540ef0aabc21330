"""The coordinator role: reference policy, silo clients, the Mixture-of-Rewards router, GRPO, evaluation.

Imports `mor_secure` only; it never imports `silo_agent` (the roles meet
through the wire contract).
"""
