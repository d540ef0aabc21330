"""Secure aggregation: the coordinator learns the sum of the silos' weighted scores and nothing of any one.

fixed_point (reals as exact integers mod t), masks (pairwise, cancelling),
agreement (signed X25519 keys), he_context (TenSEAL BFV), aggregation (the
arithmetic of a round).
"""
