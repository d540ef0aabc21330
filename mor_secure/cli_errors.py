"""Turn expected, user-fixable failures into one clear line and a non-zero exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence

from mor_secure.audit.store import AuditLogError
from mor_secure.config import ConfigError
from mor_secure.data.consortium import UnknownNameError
from mor_secure.data.importer import DataImportError
from mor_secure.privacy import BudgetExceededError
from mor_secure.wire.errors import SiloError


class RoundFailedError(RuntimeError):
    """Too few silos answered a scoring round for the consortium's minimum participants.

    Raised by the coordinator's fusion (coordinator/fusion.py re-exports it); defined here because
    `mor_secure` never imports a role package (DESIGN §3) and USER_ERRORS must name it.
    """


# Failures a user can act on from the message alone; anything else is a bug and keeps its traceback.
# A SiloError is a silo's refusal (or absence), with the status it chose and why; a RoundFailedError names the
# silos missing from a round; the OS errors are a path given wrong (a file where a directory belongs, or the
# other way round, or one the user may not write).
USER_ERRORS = (ConfigError, DataImportError, BudgetExceededError, FileNotFoundError, FileExistsError,
               NotADirectoryError, IsADirectoryError, PermissionError, ValueError, SiloError, AuditLogError,
               UnknownNameError, RoundFailedError)
EXIT_USER_ERROR = 1


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str],
                actions: Mapping[str, Callable[[argparse.Namespace], int]]) -> int:
    """Parse `argv`, run the action named by `args.command`, and return an exit code.

    argparse's SystemExit becomes a return value (`--help` 0, usage error 2), so
    every group keeps `main(argv) -> int`; user errors print as
    `PROG: error: message` and give 1; anything else is a bug and keeps its traceback.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return actions[args.command](args)
    except USER_ERRORS as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
