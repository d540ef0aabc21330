"""`mor silo ...`: the silo operator's commands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from mor_secure.cli_errors import run_command

from .training import load_silo_config, open_ledger, train_silo

PROG = "mor silo"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Silo operator commands.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the silo's DP reward model from its YAML")
    train.add_argument("--config", required=True, help="silo YAML (see silo_agent/config.py)")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ledger = commands.add_parser("ledger", help="show the privacy ledger: budget, every spend, what is left")
    ledger.add_argument("--config", required=True, help="silo YAML")
    return parser


def _train(args: argparse.Namespace) -> int:
    outcome = train_silo(load_silo_config(args.config), progress=not args.no_progress)
    r = outcome.report
    print(f"reward model: {outcome.model_dir}")
    print(f"privacy report: {outcome.report_path}")
    print(f"epsilon {r.epsilon:.3f}  delta {r.delta:g}  noise {r.noise_multiplier:.3f}  "
          f"sample rate {r.sample_rate:.4f}  steps {r.steps}  clip {r.max_grad_norm}  accountant {r.accountant}")
    return 0


def _ledger(args: argparse.Namespace) -> int:
    ledger = open_ledger(load_silo_config(args.config))
    print(json.dumps({
        "budget": {"epsilon": ledger.epsilon_budget, "delta": ledger.delta_budget},
        "spent": {"epsilon": ledger.spent_epsilon, "delta": ledger.spent_delta},
        "remaining": {"epsilon": ledger.remaining_epsilon, "delta": ledger.remaining_delta},
        "spends": [{"timestamp": s.timestamp, "purpose": s.purpose, "epsilon": s.epsilon, "delta": s.delta}
                   for s in ledger.spends],
    }, indent=2))
    return 0


def main(argv: Sequence[str]) -> int:
    return run_command(_parser(), argv, {"train": _train, "ledger": _ledger})
