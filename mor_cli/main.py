"""`mor <group> <command> ...`: one CLI, a group per role, each imported lazily.

Every group module exposes `main(argv) -> int`; so does this one, so tests
call it directly instead of spawning processes.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

from mor_secure.weakened_privacy import WeakenedPrivacyWarning

# group -> (module defining it, one-line help).
GROUPS: dict[str, tuple[str, str]] = {
    "pki": ("mor_cli.pki_cli", "consortium operator: the certificate authority, party kits, revocation"),
    "silo": ("silo_agent.cli", "silo operator: create the privacy ledger, train a DP reward model, serve it, inspect the ledger"),
    "coordinator": ("coordinator.cli", "consortium operator: build the VLM, train and evaluate the reference"),
    "audit": ("mor_cli.audit_cli", "compliance reviewer: verify and reconcile the parties' audit logs, report"),
    "demo": ("mor_cli.demo", "run the whole consortium locally with embedded defaults"),
}


def _usage() -> str:
    lines = ["usage: mor <group> <command> [options]", "", "groups:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in GROUPS.items()]
    lines += ["", "Run `mor <group> --help` for a group's commands."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    group, rest = argv[0], argv[1:]
    if group not in GROUPS:
        print(f"mor: unknown group {group!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Weakened-privacy warnings come both as warnings (for library users) and as log lines; here the log line
    # says each once (mor_secure.weakened_privacy).
    warnings.filterwarnings("ignore", category=WeakenedPrivacyWarning)
    if group in ("coordinator", "demo"):
        from .roles import allow_in_process_silos

        allow_in_process_silos()
    module = importlib.import_module(GROUPS[group][0])
    return module.main(rest)


def entry_point() -> None:
    sys.exit(main())
