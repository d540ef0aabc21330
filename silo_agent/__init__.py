"""The silo role: trains a differentially private reward model on private pairs and scores.

Imports `mor_secure` only; it never imports `coordinator`.
"""
