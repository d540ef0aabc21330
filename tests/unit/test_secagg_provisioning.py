"""`mor pki init` / `issue` give silos the secret HE context and signed agreement keys, the coordinator the public one."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from mor_cli.pki_cli import init_pki, main as pki_main
from mor_secure.pki.kits import CertKit
from mor_secure.secagg import aggregation
from mor_secure.secagg.agreement import verified_agreement_key
from mor_secure.secagg.provisioning import (
    AGREEMENT_KEY_FILE,
    HE_SECRET_FILE,
    coordinator_context,
    silo_agreement,
    silo_context,
)


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory, consortium_path: Path) -> Path:
    root = tmp_path_factory.mktemp("provisioned")
    init_pki(consortium_path, root / "pki", days=2)
    return root / "pki"


def test_silos_hold_the_secret_context_and_signed_agreement_keys(provisioned: Path) -> None:
    for silo in ("hospital-a", "bank-b", "hospital-c"):
        kit = CertKit.load(provisioned / "kits" / f"silo-{silo}")
        for private in (HE_SECRET_FILE, AGREEMENT_KEY_FILE):
            assert stat.S_IMODE((kit.directory / private).stat().st_mode) == 0o600
        assert silo_context(kit).is_private()
        _, signed = silo_agreement(kit)
        assert signed.party == f"mor://silo/{silo}"
        verified_agreement_key(signed, kit.certificate())


def test_the_coordinator_holds_only_the_public_context_and_cannot_decrypt(provisioned: Path) -> None:
    coordinator = CertKit.load(provisioned / "kits" / "coordinator-coordinator")
    assert not (coordinator.directory / HE_SECRET_FILE).exists()
    public = coordinator_context(coordinator)
    silo = silo_context(CertKit.load(provisioned / "kits" / "silo-hospital-a"))
    ciphertext = aggregation.contribution([0.5, -1.0], np.zeros(2, dtype=np.int64), public)
    with pytest.raises(ValueError, match="doesn't hold a secret_key"):
        aggregation.decrypt(ciphertext, public)
    assert aggregation.unblind(aggregation.decrypt(ciphertext, silo), np.zeros(2, dtype=np.int64), 2).tolist() == [
        0.5, -1.0]  # same consortium context: a silo decrypts what the coordinator's public context encrypted


def test_a_silo_issued_later_joins_the_same_context_and_a_renewal_re_signs_its_agreement_key(provisioned: Path,
                                                                                              capsys) -> None:
    out = provisioned / "kits" / "silo-hospital-d"
    assert pki_main(["issue", "--ca", str(provisioned / "ca"), "--role", "silo", "--name", "hospital-d",
                     "--out", str(out)]) == 0
    kit = CertKit.load(out)
    _, first = silo_agreement(kit)
    public = coordinator_context(CertKit.load(provisioned / "kits" / "coordinator-coordinator"))
    ciphertext = aggregation.contribution([2.0], np.zeros(1, dtype=np.int64), public)
    assert aggregation.unblind(aggregation.decrypt(ciphertext, silo_context(kit)), np.zeros(1, dtype=np.int64),
                               1).tolist() == [2.0]
    assert pki_main(["issue", "--ca", str(provisioned / "ca"), "--role", "silo", "--name", "hospital-d",
                     "--out", str(out), "--renew"]) == 0
    _, renewed = silo_agreement(CertKit.load(out))  # verified against the NEW certificate
    assert renewed.public_key == first.public_key and renewed.signature != first.signature
    capsys.readouterr()


def test_a_renewal_after_a_compromise_replaces_the_agreement_key_a_copied_kit_holds(provisioned: Path,
                                                                                     capsys) -> None:
    """The renewed, unrevoked certificate must not vouch for the X25519 key whoever copied the kit has."""
    out = provisioned / "kits" / "silo-hospital-e"
    issue = ["issue", "--ca", str(provisioned / "ca"), "--role", "silo", "--name", "hospital-e", "--out", str(out)]
    assert pki_main(issue) == 0
    stolen = (out / AGREEMENT_KEY_FILE).read_bytes()
    _, first = silo_agreement(CertKit.load(out))
    assert pki_main([*issue, "--renew", "--new-agreement-key"]) == 0
    private, renewed = silo_agreement(CertKit.load(out))  # the pair matches and the new certificate signed it
    assert renewed.public_key != first.public_key and (out / AGREEMENT_KEY_FILE).read_bytes() != stolen
    assert stat.S_IMODE((out / AGREEMENT_KEY_FILE).stat().st_mode) == 0o600
    assert sorted(p.name for p in out.iterdir() if "agreement" in p.name) == ["agreement.json", AGREEMENT_KEY_FILE]
    capsys.readouterr()
    assert pki_main([*issue[:-2], "--out", str(provisioned / "kits" / "silo-hospital-f"), "--new-agreement-key"]) == 1
    assert "--new-agreement-key replaces the key-agreement key of a silo kit renewed with --renew" in (
        capsys.readouterr().err)
    assert not (provisioned / "kits" / "silo-hospital-f").exists()


def test_a_kit_whose_agreement_key_and_its_signed_public_half_differ_is_refused(provisioned: Path) -> None:
    """What a replacement killed between its two files leaves: the server must not start masking with it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519

    from mor_secure.secagg.agreement import AgreementKeyError

    out = provisioned / "kits" / "silo-hospital-g"
    assert pki_main(["issue", "--ca", str(provisioned / "ca"), "--role", "silo", "--name", "hospital-g",
                     "--out", str(out)]) == 0
    (out / AGREEMENT_KEY_FILE).write_bytes(x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(AgreementKeyError, match="is not the public half of agreement.key"):
        silo_agreement(CertKit.load(out))
