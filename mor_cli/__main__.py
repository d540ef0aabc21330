"""`python -m mor_cli ...` is `mor ...` (for scripts and tests that start a party as its own process)."""

from .main import entry_point

entry_point()
