"""`mor silo init` and `mor silo ledger` on real ledger files: what they refuse and what they report."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from pathlib import Path

import pytest

from mor_secure.config import ConfigError
from mor_secure.privacy import NOISE_SEEDED
from silo_agent.cli import main
from silo_agent.training import REPORT_FILE, TRAINING_LOCK_FILE, ledger_path, load_silo_config, open_ledger

from test_privacy_ledger import add_a_charge_from_before_data_unit

SILO_YAML = "name: hospital-a\nconsortium: consortium.yaml\nworkdir: work/hospital-a\narchitecture: small_cnn\n"
SEEDED = "training:\n  dp:\n    insecure_seeded_noise: 7\n"


@pytest.fixture
def silo_yaml(tmp_path: Path, consortium_path: Path) -> Path:
    shutil.copy(consortium_path, tmp_path / "consortium.yaml")
    path = tmp_path / "hospital-a.yaml"
    path.write_text(SILO_YAML, encoding="utf-8")
    return path


def spend_and_lose_the_ledger(silo_yaml: Path) -> Path:
    """`init`, a run that spends 7.99, its public report; then the ledger file alone is deleted."""
    assert main(["init", "--config", str(silo_yaml)]) == 0
    config = load_silo_config(silo_yaml)
    ledger = open_ledger(config)
    ledger.settle(ledger.reserve(purpose="train:reward-model:small_cnn", epsilon=8.0, delta=1e-5,
                                 details={"privacy_unit": "image"}), epsilon=7.99, delta=1e-5)
    (config.workdir / REPORT_FILE).write_text(json.dumps({"ledger": {"spent_epsilon": 7.99}}), encoding="utf-8")
    ledger_path(config).unlink()
    return ledger_path(config)


def test_init_refuses_a_used_workdir_whose_ledger_is_gone(silo_yaml: Path, capsys: pytest.CaptureFixture) -> None:
    """A fresh ledger there would hand the silo its whole budget again for the data it already trained on."""
    path = spend_and_lose_the_ledger(silo_yaml)
    capsys.readouterr()
    assert main(["init", "--config", str(silo_yaml)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mor silo: error: ") and err.count("\n") == 1
    assert "was used before" in err and "privacy_ledger.json.lock" in err and REPORT_FILE in err
    assert "Restore privacy_ledger.json from backup" in err and "--force-new-ledger" in err
    assert not path.exists()


def test_forced_init_during_a_training_is_refused_and_changes_nothing(silo_yaml: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    path = spend_and_lose_the_ledger(silo_yaml)
    with open(path.parent / TRAINING_LOCK_FILE, "a+b") as training:  # a `mor silo train` in another process
        fcntl.flock(training, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert main(["init", "--config", str(silo_yaml), "--force-new-ledger"]) == 1
    err = capsys.readouterr().err
    assert "another `mor silo train` or `mor silo init` is running on this workdir" in err and "lose the spend" in err
    assert not path.exists()


def test_init_goes_ahead_in_a_workdir_that_holds_only_the_training_lock(silo_yaml: Path) -> None:
    """A `mor silo train` stopped before it wrote anything leaves its lock file: no sign of a lost ledger."""
    workdir = load_silo_config(silo_yaml).workdir
    workdir.mkdir(parents=True)
    (workdir / TRAINING_LOCK_FILE).touch()
    assert main(["init", "--config", str(silo_yaml)]) == 0
    assert open_ledger(load_silo_config(silo_yaml)).charges == ()


def test_forced_init_in_a_used_workdir_says_loudly_what_it_discards(silo_yaml: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = spend_and_lose_the_ledger(silo_yaml)
    with caplog.at_level(logging.WARNING):
        assert main(["init", "--config", str(silo_yaml), "--force-new-ledger"]) == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "FORCED NEW LEDGER" in warning and "VOIDS" in warning and REPORT_FILE in warning
    assert path.exists()


def test_ledger_marks_a_seeded_noise_charge_not_private_and_names_its_unit(
        silo_yaml: Path, capsys: pytest.CaptureFixture) -> None:
    silo_yaml.write_text(SILO_YAML + SEEDED, encoding="utf-8")
    with pytest.warns(UserWarning, match="SEEDED"):
        assert main(["init", "--config", str(silo_yaml)]) == 0
        ledger = open_ledger(load_silo_config(silo_yaml))
    # What train_silo reserves and _train_private settles for a seeded run.
    reservation = ledger.reserve(purpose="train:reward-model:small_cnn", epsilon=8.0, delta=1e-5,
                                 details={"mechanism": "dp-sgd", "privacy_unit": "image", "guarantee_unit": "image",
                                          "noise": NOISE_SEEDED})
    ledger.settle(reservation, epsilon=7.99, delta=1e-5, details={"noise": NOISE_SEEDED, "private": False})
    capsys.readouterr()
    with pytest.warns(UserWarning, match="SEEDED"):
        assert main(["ledger", "--config", str(silo_yaml)]) == 0
        (line,) = [line for line in capsys.readouterr().out.splitlines() if "train:reward-model" in line]
        assert "per image" in line and "NOT PRIVATE" in line
        assert main(["ledger", "--config", str(silo_yaml), "--json"]) == 0
    (charge,) = json.loads(capsys.readouterr().out)["charges"]
    assert (charge["privacy_unit"], charge["noise"], charge["private"]) == ("image", NOISE_SEEDED, False)


@pytest.mark.parametrize("dp", ["    enabled: false\n", "    insecure_seeded_noise: 7\n"])
def test_own_data_with_dp_off_or_seeded_noise_is_refused_at_load(silo_yaml: Path, dp: str) -> None:
    """A silo's own data is what must stay private: a run without a guarantee on it would reach no ledger (DP
    off) or be charged as if private, and its model be served. Simulations use the benchmark partition."""
    silo_yaml.write_text(SILO_YAML + "data:\n  pairs: pairs.jsonl\n  images: images\ntraining:\n  dp:\n" + dp,
                         encoding="utf-8")
    with pytest.raises(ValueError, match=r"data: names the silo's own data.*differential privacy"):
        load_silo_config(silo_yaml)
    silo_yaml.write_text(SILO_YAML + "training:\n  dp:\n" + dp, encoding="utf-8")  # the benchmark: allowed, loudly
    assert load_silo_config(silo_yaml).data is None


@pytest.mark.parametrize(("drain", "says"), [
    (".inf", "Input should be a finite number"),
    (".nan", "Input should be a finite number"),
    ("3601", "Input should be less than or equal to 3600"),
], ids=["inf", "nan", "over-an-hour"])
def test_serve_drain_seconds_must_be_finite_and_at_most_an_hour(silo_yaml: Path, drain: str, says: str) -> None:
    """gRPC's shutdown thread dies with OverflowError on an infinite grace: the silo would never drain or stop."""
    silo_yaml.write_text(SILO_YAML + f"serve:\n  kit: kit\n  drain_seconds: {drain}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"hospital-a\.yaml: invalid SiloConfig: serve\.drain_seconds: {says}"):
        load_silo_config(silo_yaml)
    silo_yaml.write_text(SILO_YAML + "serve:\n  kit: kit\n  drain_seconds: 3600\n", encoding="utf-8")
    assert load_silo_config(silo_yaml).serve.drain_seconds == 3600


def test_the_ledger_command_asks_for_and_records_the_unit_of_charges_from_before_data_unit(
        silo_yaml: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["init", "--config", str(silo_yaml)]) == 0
    add_a_charge_from_before_data_unit(ledger_path(load_silo_config(silo_yaml)))
    capsys.readouterr()
    assert main(["ledger", "--config", str(silo_yaml)]) == 0
    out = capsys.readouterr().out
    assert "per image or patient (recorded before data.unit; undeclared)" in out
    assert f"--config {silo_yaml} --declare-earlier-unit patient|image" in out
    assert main(["ledger", "--config", str(silo_yaml), "--declare-earlier-unit", "patient"]) == 0
    out = capsys.readouterr().out
    assert "declared: the charges recorded before data.unit are per patient" in out
    assert "  per patient  settled" in out and "undeclared" not in out
    assert main(["ledger", "--config", str(silo_yaml), "--json"]) == 0
    assert [c["privacy_unit"] for c in json.loads(capsys.readouterr().out)["charges"]] == ["patient"]
    assert main(["ledger", "--config", str(silo_yaml), "--declare-earlier-unit", "image"]) == 1
    assert "declared already (patient)" in capsys.readouterr().err
    assert [c.privacy_unit for c in open_ledger(load_silo_config(silo_yaml)).charges] == ["patient"]


def test_declaring_with_json_keeps_stdout_json(silo_yaml: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["init", "--config", str(silo_yaml)]) == 0
    add_a_charge_from_before_data_unit(ledger_path(load_silo_config(silo_yaml)))
    capsys.readouterr()
    assert main(["ledger", "--config", str(silo_yaml), "--declare-earlier-unit", "image", "--json"]) == 0
    captured = capsys.readouterr()
    assert [c["privacy_unit"] for c in json.loads(captured.out)["charges"]] == ["image"]
    assert "declared: the charges recorded before data.unit are per image" in captured.err


def test_own_data_needs_a_public_unit_count(silo_yaml: Path) -> None:
    """The published schedule is planned from it: from the private count it would give that count away."""
    silo_yaml.write_text(SILO_YAML + "data:\n  pairs: pairs.jsonl\n  images: images\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"set training.dp.public_unit_count to a count you may publish"):
        load_silo_config(silo_yaml)
    silo_yaml.write_text(SILO_YAML + "data:\n  pairs: pairs.jsonl\n  images: images\n"
                         "training:\n  dp:\n    public_unit_count: 5000\n", encoding="utf-8")
    assert load_silo_config(silo_yaml).training.dp.public_unit_count == 5000


@pytest.mark.parametrize("force", [[], ["--force-new-ledger"]], ids=["plain", "forced"])
def test_init_with_the_configs_own_folder_as_workdir_says_so(silo_yaml: Path, capsys: pytest.CaptureFixture,
                                                             force: list[str]) -> None:
    """`workdir: .` holds the YAML: not a workdir that lost its ledger, and a ledger beside the YAML is no fix."""
    silo_yaml.write_text(SILO_YAML.replace("workdir: work/hospital-a", "workdir: ."), encoding="utf-8")
    capsys.readouterr()
    assert main(["init", "--config", str(silo_yaml), *force]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mor silo: error: ") and err.count("\n") == 1
    assert "is this config's own folder" in err and "set workdir to a new subdirectory" in err
    assert "was used before" not in err
    assert not ledger_path(load_silo_config(silo_yaml)).exists()


def test_the_ledger_shows_why_a_charge_was_released_at_zero(silo_yaml: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["init", "--config", str(silo_yaml)]) == 0
    ledger = open_ledger(load_silo_config(silo_yaml))
    ledger.release(ledger.reserve(purpose="train:reward-model:small_cnn", epsilon=8.0, delta=1e-5,
                                  details={"privacy_unit": "image"}), reason="the job failed before DP-SGD started")
    capsys.readouterr()
    assert main(["ledger", "--config", str(silo_yaml)]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "train:reward-model" in line]
    assert line.endswith("epsilon 0  delta 0  per image  settled (released unspent: the job failed before DP-SGD "
                         "started)")
    assert main(["ledger", "--config", str(silo_yaml), "--json"]) == 0
    (charge,) = json.loads(capsys.readouterr().out)["charges"]
    assert charge["outcome"] == "released unspent: the job failed before DP-SGD started"
