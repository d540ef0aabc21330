"""`mor pki ...`: the consortium operator's certificate authority.

    mor pki init --consortium consortium.yaml --out pki/     CA + one kit per party of the consortium file
    mor pki issue --ca pki/ca --role silo --name hospital-d --out pki/kits/silo-hospital-d [--renew]
    mor pki revoke --ca pki/ca (--serial HEX | --identity mor://silo/hospital-d) [--reason TEXT]
    mor pki list --ca pki/ca
    mor pki crl --ca pki/ca                                    re-sign the CRL before it goes stale

Kits are directories (mor_secure/pki/kits.py); hand each party its own and
nothing else: `issue` refuses a party that already has a live kit elsewhere.
Private keys are written mode 0600 and never overwritten. `list` needs only
ca.pem and issued.json, so ca.key can stay offline but to sign.
Silo kits also get the consortium's homomorphic-encryption context with its
secret key and an X25519 key whose public half their certificate key signs;
the coordinator's kit gets the public context only
(mor_secure/secagg/provisioning.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
from collections.abc import Sequence
from pathlib import Path

from mor_secure.cli_errors import run_command
from mor_secure.data import load_consortium
from mor_secure.pki import CertificateAuthority, PartyIdentity, Role
from mor_secure.pki.authority import DEFAULT_HOSTS, LEAF_LIFETIME
from mor_secure.secagg.provisioning import new_consortium_context, provision_kit

PROG = "mor pki"
CA_DIR, KITS_DIR = "ca", "kits"
# A century: far past any CA's lifetime (5 years), so a long lifetime meets "would outlive the CA", and far from
# the year 9999 where Python's dates end (99999999 days overflowed there with a traceback).
MAX_DAYS = 36500


def kit_dir(root: Path, identity: PartyIdentity) -> Path:
    """Where `init` puts a party's kit: <root>/kits/<role>-<name>."""
    return root / KITS_DIR / f"{identity.role.value}-{identity.name}"


def consortium_parties(consortium_path: str | Path) -> list[PartyIdentity]:
    """Every party the consortium file names: its silos, its coordinator and its auditors."""
    spec = load_consortium(consortium_path)
    return ([PartyIdentity(Role.SILO, s.name) for s in spec.silos] + [PartyIdentity(Role.COORDINATOR, spec.coordinator)]
            + [PartyIdentity(Role.AUDITOR, a) for a in spec.auditors])


def init_pki(consortium_path: str | Path, out: str | Path, *, days: int) -> tuple[CertificateAuthority, dict]:
    """A new CA under <out>/ca and a kit per consortium party under <out>/kits, with secure-aggregation keys.

    All or nothing: `out` must be new or empty, and a failure part way removes
    what this call wrote, so a consortium never starts from half a PKI (a CA
    whose kits were not all issued, which a second `init` would then refuse).
    """
    out = Path(out)
    parties = consortium_parties(consortium_path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: `mor pki init` makes a consortium's PKI in a new or "
                              "empty directory (use the CA there with `mor pki issue` to add a party; an init cut "
                              "short by a kill leaves a partial one: remove it and run init again)")
    out.mkdir(parents=True, exist_ok=True)
    try:
        authority = CertificateAuthority.create(out / CA_DIR)
        new_consortium_context(authority.directory)
        kits = {}
        for party in parties:
            kits[party.uri] = authority.issue(party, kit_dir(out, party), lifetime=dt.timedelta(days=days))
            provision_kit(kits[party.uri], party.role, authority.directory)
    except BaseException:
        for written in out.iterdir():  # all of it ours: `out` was empty
            shutil.rmtree(written) if written.is_dir() else written.unlink()
        raise
    return authority, kits


def _days(text: str) -> int:
    days = int(text)
    if days < 1:
        raise argparse.ArgumentTypeError(f"a certificate lifetime is at least 1 day, got {days}")
    if days > MAX_DAYS:
        raise argparse.ArgumentTypeError(f"a certificate lifetime is at most {MAX_DAYS} days, got {days}")
    return days


def _serial(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a serial is hexadecimal, as `mor pki list` shows it, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Consortium PKI: CA, kits, revocation.")
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="create the CA and one kit per party named in the consortium file")
    init.add_argument("--consortium", required=True, help="consortium YAML (silos, coordinator, auditors)")
    init.add_argument("--out", required=True, help="PKI directory to create (ca/ and kits/)")
    init.add_argument("--days", type=_days, default=LEAF_LIFETIME.days, help="leaf certificate lifetime in days")
    issue = commands.add_parser("issue", help="issue (or renew) one party's kit")
    issue.add_argument("--ca", required=True, help="the CA directory (pki/ca)")
    issue.add_argument("--role", required=True, choices=[r.value for r in Role])
    issue.add_argument("--name", required=True, help="party name, e.g. hospital-d")
    issue.add_argument("--out", required=True, help="kit directory to write")
    issue.add_argument("--days", type=_days, default=LEAF_LIFETIME.days, help="certificate lifetime in days")
    issue.add_argument("--host", action="append", default=[], help="host name or IP the party serves on "
                       f"(repeatable; added to {' and '.join(DEFAULT_HOSTS)}, which the certificate always names)")
    issue.add_argument("--renew", action="store_true", help="replace an existing kit's certificate and key "
                       "(the old key is kept as party-retired-<serial>.key); servers pick it up without a restart")
    issue.add_argument("--new-agreement-key", action="store_true", help="with --renew, after a key compromise: "
                       "also replace the silo's secure-aggregation key (agreement.key), which a renewal otherwise "
                       "keeps; restart the silo, then the coordinator, to use it")
    revoke = commands.add_parser("revoke", help="revoke a certificate and re-sign the CRL")
    revoke.add_argument("--ca", required=True)
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--serial", type=_serial, help="certificate serial (hex, as `mor pki list` shows it)")
    target.add_argument("--identity", help="revoke every live certificate of this party, e.g. mor://silo/hospital-d")
    revoke.add_argument("--reason", default="unspecified", help="recorded in issued.json")
    listing = commands.add_parser("list", help="every certificate issued, with its status")
    listing.add_argument("--ca", required=True)
    crl = commands.add_parser("crl", help="re-sign the CRL (it is valid for 7 days)")
    crl.add_argument("--ca", required=True)
    return parser


def _init(args: argparse.Namespace) -> int:
    authority, kits = init_pki(args.consortium, args.out, days=args.days)
    print(f"consortium CA: {authority.directory} (ca.key is stored unencrypted: keep it offline, mode 0600; it "
          "signs every kit and the CRL)")
    for identity, kit in kits.items():
        print(f"  {identity:<36} {kit.directory}")
    print("hand each party its own kit directory, and nothing else")
    return 0


def _issue(args: argparse.Namespace) -> int:
    authority = CertificateAuthority(args.ca)
    identity = PartyIdentity(Role(args.role), args.name)
    if args.new_agreement_key and not (args.renew and identity.role == Role.SILO):
        raise ValueError("--new-agreement-key replaces the key-agreement key of a silo kit renewed with --renew; "
                         "a new silo kit gets a new one anyway, and other kits have none")
    kit = authority.issue(identity, args.out, lifetime=dt.timedelta(days=args.days),
                          hosts=tuple(dict.fromkeys([*DEFAULT_HOSTS, *args.host])), renew=args.renew,
                          refuse_second_live_kit=True)
    provision_kit(kit, identity.role, authority.directory, new_agreement_key=args.new_agreement_key)
    serial = kit.certificate().serial_number
    print(f"{'renewed' if args.renew else 'issued'} {identity}: serial {serial:x}, kit {kit.directory}")
    # Only in this kit directory (issue refuses another): the renewed one, or one whose kit was deleted.
    for old in (row for row in authority.live_certificates(identity) if row.serial != serial):
        print(f"the old certificate {old.serial:x} stays valid until {old.not_after}; if its key may be "
              f"compromised, revoke it: mor pki revoke --ca {authority.directory} --serial {old.serial:x}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    authority = CertificateAuthority(args.ca)
    serials = authority.revoke(serial=args.serial, identity=args.identity,
                               reason=args.reason)
    print(f"revoked {', '.join(f'{s:x}' for s in serials)}; CRL re-signed at {authority.directory / 'crl.pem'} "
          "(servers re-read it on their next call)")
    return 0


def _list(args: argparse.Namespace) -> int:
    now = dt.datetime.now(dt.timezone.utc)
    for row in CertificateAuthority(args.ca).issued():
        if row.revoked_at:
            status = f"revoked {row.revoked_at} ({row.revocation_reason})"
        elif dt.datetime.fromisoformat(row.not_after) <= now:
            status = f"expired {row.not_after}"
        else:
            status = f"valid until {row.not_after}"
        print(f"{row.serial:x}  {row.identity:<36} {status:<37} kit {row.kit}")
    return 0


def _crl(args: argparse.Namespace) -> int:
    print(f"CRL re-signed: {CertificateAuthority(args.ca).write_crl()}")
    return 0


def main(argv: Sequence[str]) -> int:
    return run_command(_parser(), argv, {"init": _init, "issue": _issue, "revoke": _revoke, "list": _list,
                                         "crl": _crl})
