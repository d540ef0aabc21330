"""Turn expected, user-fixable failures into one clear line and a non-zero exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from collections.abc import Callable

from mor_secure.config import ConfigError
from mor_secure.data.importer import DataImportError
from mor_secure.privacy import BudgetExceededError

# Failures a user can act on from the message alone; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, DataImportError, BudgetExceededError, FileNotFoundError, ValueError)
EXIT_USER_ERROR = 1


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """argparse without SystemExit: `--help` gives 0 and a usage error 2, as exit codes to return."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0


def run_reporting_errors(prog: str, action: Callable[[], int]) -> int:
    """Run `action`; print user errors as `prog: error: message` and return 1."""
    try:
        return action()
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
