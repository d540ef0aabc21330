"""`mor audit ...`: the compliance reviewer's three commands.

    mor audit verify LOG --cert CERT | --ca CA       is this log whole and are its checkpoints the party's?
    mor audit reconcile COORDINATOR_LOG SILO_LOG... --ca CA
                                                     does what the coordinator asked match what each silo answered?
    mor audit report COORDINATOR_LOG SILO_LOG... --ca CA --out report.html
                                                     both checks and the activity, on one page

`verify` and `reconcile` exit 1 when they find a problem and print each one
(verify names the first bad entry; reconcile also names each silo the
coordinator called or asked whose log was not given); `report` writes the page either way,
says whether the record is intact, and exits 1 when it is not. Each log says
whose it is: the coordinator's comes first, then each silo's once, or the
command stops and says so. Logs are opened read-only: a reviewer may run
these on a live party's log or on a copy.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from mor_secure.audit import read_log
from mor_secure.audit.checkpoints import key_id
from mor_secure.audit.evidence import check_logs, report_view
from mor_secure.audit.reconcile import check_parties, reconcile, unlogged_silos
from mor_secure.audit.report import write_report
from mor_secure.audit.report_view import utc_text
from mor_secure.audit.store import StoredLog
from mor_secure.audit.verify import Verification, verify_log
from mor_secure.cli_errors import run_command
from mor_secure.pki import identity_of

PROG = "mor audit"


def _certificate(path: str | Path) -> x509.Certificate:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no certificate there (a kit's party.pem or the consortium's ca.pem)")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise ValueError(f"{path} is not a PEM certificate") from None


def describe_verification(path: Path, result: Verification) -> list[str]:
    """What `verify` prints about one log."""
    lines = [f"{path}: log of {result.party}, {result.entries} entries, {result.checkpoints} signed checkpoints"]
    if result.latest is not None:
        lines.append(f"  latest checkpoint: size {result.latest.size}, root {result.latest.root.hex()}, signed "
                     f"{utc_text(result.latest.time)}")
    if result.uncovered_entries and result.checkpoints:  # with none at all, the problem below says why
        lines.append(f"  {result.uncovered_entries} newest entries are not yet covered by a signed checkpoint "
                     "(a silo signs one with every answer, the coordinator every 256 entries or 30 s, and both when "
                     "they stop)")
    if result.ok:
        lines.append("  VERIFIED: every entry in place and unaltered; every checkpoint signed by this party and "
                     "consistent with the entries")
    else:
        first = result.first_bad_entry
        lines.append(f"  FAILED: {result.problem_count} problem(s)"
                     + (f", the first {len(result.problems)} listed" if result.unlisted_problems else "")
                     + (f"; the first bad entry is entry {first}" if first is not None else ""))
        lines += [f"  - {problem.message}" for problem in result.problems]
    return lines


def _verify(args: argparse.Namespace) -> int:
    log = read_log(args.log)
    if args.ca is not None:
        # Every certificate the CA issued to this party that the log keeps: a renewed kit's old ones too.
        certificates = log.certificates_issued_by(_certificate(args.ca))
        print(f"{args.log}: checkpoints checked against the {len(certificates)} certificate(s) of {log.party} "
              f"that the log holds and {args.ca} issued (serials {', '.join(_serials(certificates)) or 'none'})")
    else:
        certificates = [_certificate(c) for c in args.cert]
    result = verify_log(log, certificates)
    lines = describe_verification(Path(args.log), result)
    if not result.ok and args.ca is None:
        lines += _certificate_hint(log, certificates)
    print("\n".join(lines))
    return 0 if result.ok else 1


def _serials(certificates: Sequence[x509.Certificate]) -> list[str]:
    return [f"{c.serial_number:x}" for c in certificates]  # hex, as `mor pki list` shows them


def _certificate_hint(log: StoredLog, given: Sequence[x509.Certificate]) -> list[str]:
    """What to try when the certificates given are not all the log's party's: another party's, or too few."""
    if log.party not in (named := {_party_named(c) for c in given}):
        return [f"  None of the certificates given is {log.party}'s (they name "
                f"{', '.join(sorted(p or 'no party' for p in named))}): give its own, or --ca CA (the consortium's "
                "ca.pem)"]
    if others := _other_certificates(log, given):
        return [f"  The log also holds {len(others)} other certificate(s) naming {log.party} (serials "
                f"{', '.join(_serials(others))}), as after a renewal: verify with --ca CA (the consortium's ca.pem) "
                "to check each checkpoint against every certificate the CA issued to this party"]
    return []


def _party_named(certificate: x509.Certificate) -> str | None:
    try:
        return identity_of(certificate).uri
    except ValueError:  # names no party
        return None


def _other_certificates(log: StoredLog, given: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """The log's certificates naming its party whose key none of `given` holds (unchecked: a hint, not evidence)."""
    keys = {key_id(c.public_key()) for c in given}
    return [c for c in log.certificates if _party_named(c) == log.party and key_id(c.public_key()) not in keys]


def _reconcile(args: argparse.Namespace) -> int:
    ca = _certificate(args.ca)
    coordinator = read_log(args.coordinator_log)
    silos = [read_log(path) for path in args.silo_logs]
    check_parties(coordinator, silos)
    failed = False
    for silo in silos:
        result = reconcile(coordinator, silo, ca)
        print(f"{result.silo}: {result.matched} queries found in both logs, {result.not_delivered} that never "
              f"reached the silo, {result.checkpoints_checked} of its checkpoints checked against its log today")
        if result.ok:
            print("  RECONCILED: the coordinator's record and the silo's agree")
        else:
            failed = True
            print(f"  MISMATCH: {result.mismatches_found} finding(s)"
                  + (f", the first {len(result.mismatches)} listed" if result.unlisted_mismatches else ""))
            print("\n".join(f"  - {m}" for m in result.mismatches))
    for unlogged in unlogged_silos(coordinator, silos):
        failed = True
        print(f"{unlogged.silo}: NO LOG GIVEN: {unlogged.finding()}")
    return 1 if failed else 0


def review(coordinator_log: str | Path, silo_logs: Sequence[str | Path], ca: str | Path, out: str | Path, *,
           title: str = "Consortium audit report", verbose: bool = False) -> bool:
    """Verify and reconcile every log, write the report to `out`, say where it is; True if the record is intact."""
    coordinator = read_log(coordinator_log)
    silos = [read_log(p) for p in silo_logs]
    evidence = check_logs(coordinator, silos, _certificate(ca))
    if verbose:
        for log, result in zip((coordinator, *silos), evidence.verifications, strict=True):
            print(f"verify {log.party}: " + ("verified" if result.ok else f"FAILED ({result.problems[0].message})")
                  + f", {result.entries} entries")
        for result in evidence.reconciliations:
            print(f"reconcile {result.silo}: " + (f"reconciled, {result.matched} queries in both logs" if result.ok
                                                 else f"MISMATCH ({result.mismatches[0]})"))
    view = report_view(coordinator, silos, evidence, title=title)
    page = write_report(view, out)
    intact = not view.failures()  # the page's own verdict: what the reviewer reads is what the exit status says
    verdict = "INTACT" if intact else "NOT INTACT (the page lists each finding)"
    print(f"record {verdict}; report written to {page.resolve()} (one self-contained page: open it in a browser)")
    return intact


def _report(args: argparse.Namespace) -> int:
    return 0 if review(args.coordinator_log, args.silo_logs, args.ca, args.out, title=args.title) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Check the parties' audit logs and report on them.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check one log: entries, Merkle tree, checkpoint signatures")
    verify.add_argument("log", help="the party's audit log (an SQLite file)")
    signer = verify.add_mutually_exclusive_group(required=True)
    signer.add_argument("--cert", action="append",
                        help="the party's certificate (its kit's party.pem); repeat for a renewed kit's old one")
    signer.add_argument("--ca", help="the consortium CA certificate (any kit's ca.pem): check the checkpoints "
                        "against every certificate it issued to the log's party that the log holds (a renewed "
                        "kit's old ones too)")
    rec = commands.add_parser("reconcile", help="match the coordinator's log against each silo's, query by query")
    rec.add_argument("coordinator_log")
    rec.add_argument("silo_logs", nargs="+")
    rec.add_argument("--ca", required=True, help="the consortium CA certificate (any kit's ca.pem)")
    report = commands.add_parser("report", help="write the reviewer's HTML page")
    report.add_argument("coordinator_log")
    report.add_argument("silo_logs", nargs="+")
    report.add_argument("--ca", required=True, help="the consortium CA certificate (any kit's ca.pem)")
    report.add_argument("--out", required=True, help="the HTML file to write")
    report.add_argument("--title", default="Consortium audit report")
    return parser


def main(argv: Sequence[str]) -> int:
    # A log's text is its party's: a lone surrogate (canonical JSON accepts "\ud800") is printed as that escape,
    # not an encoding error in place of the findings that quote it.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    return run_command(_parser(), argv, {"verify": _verify, "reconcile": _reconcile, "report": _report})
