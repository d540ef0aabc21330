"""`mor silo ...`: the silo operator's commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mor_secure.cli_errors import run_command
from mor_secure.privacy import NOISE_SEEDED
from mor_secure.privacy.ledger_chain import NEW_LEDGER_IS_NOT_A_RESET, LedgerExistsError
from mor_secure.privacy.ledger_units import DECLARABLE_UNITS, UNDECLARED_EARLIER_UNIT

from .config import SiloConfig
from .training import LEDGER_FILE, create_ledger, ledger_path, load_silo_config, open_ledger, train_silo

PROG = "mor silo"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Silo operator commands.")
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="create the silo's privacy ledger with its lifetime budget (once)")
    init.add_argument("--config", required=True, help="silo YAML (see silo_agent/config.py)")
    init.add_argument("--force-new-ledger", action="store_true",
                      help="DANGEROUS: replace an existing ledger (kept as *.superseded-*). Only for new data: "
                           "starting over on the same data voids the DP guarantee")
    train = commands.add_parser("train", help="train the silo's DP reward model from its YAML")
    train.add_argument("--config", required=True, help="silo YAML (see silo_agent/config.py)")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    serve = commands.add_parser("serve", help="serve the trained reward model over mutually authenticated gRPC")
    serve.add_argument("--config", required=True, help="silo YAML with a `serve:` section (kit, policy, port)")
    serve.add_argument("--port-file", help="write {\"port\": N, \"pid\": P} here once listening (for scripts)")
    serve.add_argument("--port", type=_port, help="listen on this port instead of serve.port (e.g. to restart a silo "
                       "where the coordinator's pool expects it)")
    ledger = commands.add_parser("ledger", help="show the privacy ledger: budget, every spend, what is left")
    ledger.add_argument("--config", required=True, help="silo YAML")
    ledger.add_argument("--json", action="store_true", help="print it as JSON, for scripts")
    ledger.add_argument("--declare-earlier-unit", choices=DECLARABLE_UNITS,
                        help="once, for a ledger from before data.unit: record what its DP-SGD charges were per "
                             "(patient: the rows named a unit_id; image: none did), so it can be charged again")
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is a whole number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: the OS chooses), got {port}")
    return port


def _init(args: argparse.Namespace) -> int:
    config = load_silo_config(args.config)
    _refuse_the_configs_own_folder(Path(args.config), config)
    try:
        ledger = create_ledger(config, force=args.force_new_ledger)
    except LedgerExistsError:
        raise LedgerExistsError(f"{ledger_path(config)}: this silo already has a privacy ledger, and its spends "
                                f"stay on it. {NEW_LEDGER_IS_NOT_A_RESET} For that case only: add "
                                "--force-new-ledger (the old ledger is kept as a superseded file).") from None
    print(f"privacy ledger created: {ledger.path}")
    print(f"lifetime budget: epsilon {ledger.epsilon_budget:g}, delta {ledger.delta_budget:g}; back this file up: "
          "it cannot be recreated without resetting the budget")
    return 0


def _refuse_the_configs_own_folder(config_path: Path, config: SiloConfig) -> None:
    """ValueError for a workdir (with no ledger yet) that holds the YAML itself, `workdir: .` most often: a
    workdir is for the silo's commands alone, and one holding anything else looks like one that lost its
    ledger, which `create_ledger`'s refusal would then wrongly claim."""
    config_file, workdir = config_path.resolve(), config.workdir.resolve()
    if not config_file.is_relative_to(workdir) or ledger_path(config).exists():
        return
    where = "is this config's own folder" if config_file.parent == workdir else "holds this config"
    raise ValueError(f"{config_path}: workdir {config.workdir} {where}; the silo's commands keep their ledger, "
                     "model and audit log in a workdir of their own: set workdir to a new subdirectory (e.g. "
                     "`workdir: hospital-a`), and keep the YAML and data outside it. If a ledger was lost from "
                     f"this folder, restore {LEDGER_FILE} from backup into it instead")


def _train(args: argparse.Namespace) -> int:
    config = load_silo_config(args.config)
    outcome = train_silo(config, progress=not args.no_progress)
    r = outcome.report
    print(f"reward model: {outcome.model_dir}")
    print(f"public privacy report: {outcome.report_path}")
    print(f"local diagnostics (not for release): {outcome.diagnostics_path}")
    if r.dp_enabled:
        print(f"epsilon {r.epsilon:.3f}  delta {r.delta:g}  per {r.privacy_unit}  noise {r.noise_multiplier:.3f}  "
              f"sample rate {r.sample_rate:.4f}  steps {r.steps}  clip {r.max_grad_norm}  accountant {r.accountant}")
        if not r.private:
            print(f"WARNING: noise {r.noise}: this model is NOT differentially private")
    else:
        print("WARNING: trained WITHOUT differential privacy: epsilon is infinite")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serving import serve_until_signalled

    config = load_silo_config(args.config)
    if args.port is not None:
        if config.serve is None:
            raise ValueError(f"{args.config} has no `serve:` section to override the port of")
        serve = type(config.serve).model_validate({**config.serve.model_dump(), "port": args.port})
        config = config.model_copy(update={"serve": serve})
    return serve_until_signalled(config, port_file=Path(args.port_file) if args.port_file else None)


def _ledger(args: argparse.Namespace) -> int:
    ledger = open_ledger(load_silo_config(args.config))
    if args.declare_earlier_unit is not None:
        ledger.declare_earlier_unit(args.declare_earlier_unit)
        print(f"declared: the charges recorded before data.unit are per {args.declare_earlier_unit}; this ledger "
              f"takes charges per {args.declare_earlier_unit} from now on",
              file=sys.stderr if args.json else sys.stdout)  # --json keeps stdout JSON
    if not args.json:
        print(f"privacy ledger of silo {ledger.silo}: {ledger.path}")
        for label, epsilon, delta in (("budget", ledger.epsilon_budget, ledger.delta_budget),
                                      ("spent", ledger.spent_epsilon, ledger.spent_delta),
                                      ("remaining", ledger.remaining_epsilon, ledger.remaining_delta)):
            print(f"  {label:<10} epsilon {epsilon:.4g}, delta {delta:.3g}")
        print(f"  {len(ledger.charges)} charge(s):")
        for c in ledger.charges:
            state = "settled" if c.settled else "reserved, not settled (a job running, or one that died)"
            if c.settled and "outcome" in c.details:  # a release at zero says why nothing was spent
                state += f" ({c.details['outcome']})"
            unit = f"per {c.privacy_unit}" if c.privacy_unit is not None else "no stated privacy unit"
            seeded = c.noise == NOISE_SEEDED
            print(f"    {c.timestamp}  {c.purpose}  epsilon {c.epsilon:.4g}  delta {c.delta:.3g}  {unit}  {state}"
                  + ("  NOT PRIVATE (seeded noise: whoever knows the seed can remove it)" if seeded else ""))
        if any(c.privacy_unit == UNDECLARED_EARLIER_UNIT for c in ledger.charges):
            print(f"  charges recorded before data.unit: declare their unit once, with mor silo ledger --config "
                  f"{args.config} --declare-earlier-unit patient|image (patient if your rows named a unit_id)")
        print(f"  head digest {ledger.head_digest} (record it: a ledger rolled back to an older copy has another)")
        return 0
    print(json.dumps({
        "silo": ledger.silo,
        "budget": {"epsilon": ledger.epsilon_budget, "delta": ledger.delta_budget},
        "spent": {"epsilon": ledger.spent_epsilon, "delta": ledger.spent_delta},
        "remaining": {"epsilon": ledger.remaining_epsilon, "delta": ledger.remaining_delta},
        "charges": [{"timestamp": c.timestamp, "purpose": c.purpose, "epsilon": c.epsilon, "delta": c.delta,
                     "settled": c.settled, "outcome": c.details.get("outcome") if c.settled else None,
                     "privacy_unit": c.privacy_unit, "noise": c.noise,
                     # None: the reservation named no noise source, so nobody can say.
                     "private": None if c.noise is None else c.noise != NOISE_SEEDED} for c in ledger.charges],
        "head_digest": ledger.head_digest,
    }, indent=2))
    return 0


def main(argv: Sequence[str]) -> int:
    return run_command(_parser(), argv, {"init": _init, "train": _train, "serve": _serve, "ledger": _ledger})
