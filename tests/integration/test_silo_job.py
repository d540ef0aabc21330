"""`mor silo init` / `train` / `ledger` end to end through `mor_cli.main.main(argv)`.

small_cnn is the fastest architecture: 5 public pre-training steps, then 2 DP
epochs over a silo's images (the privacy unit) at expected batch size 16.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from mor_cli.main import main
from mor_secure.models import load_reward_model
from mor_secure.models.digests import directory_digest
from mor_secure.models.images import image_key
from mor_secure.models.reward_architectures import FrozenEncoderRewardModel
from mor_secure.models.reward_architectures.small_cnn import WordsAndHead
from mor_secure.policy import SiloPolicy
from mor_secure.privacy import PrivacyReport
from mor_secure.wire.messages import ImageBlob, ScoreRequest, ScoreRow
from silo_agent import training as silo_training
from silo_agent.serving import load_service
from silo_agent.training import DIAGNOSTICS_FILE, LEDGER_FILE, MODEL_DIR, REPORT_FILE

SILO_YAML = """\
name: hospital-a
consortium: consortium.yaml
workdir: work/hospital-a
architecture: small_cnn
public_pretraining_steps: 5
training:
  epochs: 2
  batch_size: 16
  learning_rate: 0.005
  dp:
    target_epsilon: 8.0
    target_delta: 1.0e-5
    max_grad_norm: 1.0
    accountant: prv
privacy_budget:
  epsilon: 10.0
  delta: 2.0e-5
"""

# hospital-a holds 3 kinds x 40 pairs (max_pairs_per_kind) on fewer images; validation_fraction 0.1 of the
# images is held back. The exact counts are private: the tests read them from the local diagnostics.
PAIRS = 120


@dataclass(frozen=True)
class FirstRun:
    config: Path
    workdir: Path
    exit_code: int
    stdout: str
    stderr: str


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """(mtime_ns, bytes) of every file under `directory`."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def silo_dir(tmp_path_factory: pytest.TempPathFactory, consortium_path: Path) -> Path:
    """A directory holding the small consortium and, next to it, the silo YAML (relative paths)."""
    directory = tmp_path_factory.mktemp("silo")
    shutil.copy(consortium_path, directory / "consortium.yaml")
    (directory / "hospital-a.yaml").write_text(SILO_YAML, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def first_run(silo_dir: Path) -> FirstRun:
    config = silo_dir / "hospital-a.yaml"
    code, out, err = run_cli(["silo", "init", "--config", str(config)])
    assert code == 0, err
    code, out, err = run_cli(["silo", "train", "--config", str(config), "--no-progress"])
    return FirstRun(config, silo_dir / "work" / "hospital-a", code, out, err)


def all_keys(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | set().union(*(all_keys(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(all_keys(v) for v in value)) if value else set()
    return set()


def test_first_run_succeeds_and_writes_model_and_report(first_run: FirstRun) -> None:
    assert first_run.exit_code == 0, first_run.stderr
    workdir = first_run.workdir
    assert f"reward model: {workdir / MODEL_DIR}" in first_run.stdout
    assert f"privacy report: {workdir / REPORT_FILE}" in first_run.stdout
    assert {p.name for p in (workdir / MODEL_DIR).iterdir()} == {"reward_model.json", "trunk.safetensors",
                                                                 "scorer.safetensors"}
    report = json.loads((workdir / REPORT_FILE).read_text())
    assert set(report) == {"silo", "architecture", "model_digest", "trainable_params", "privacy", "standardisation",
                           "ledger"}
    assert report["model_digest"] == directory_digest(workdir / MODEL_DIR)
    assert report["silo"] == "hospital-a"
    assert report["architecture"] == "small_cnn"
    assert report["trainable_params"] == sum(p.numel() for p in WordsAndHead(32, 64, 64).parameters())
    privacy = report["privacy"]
    assert set(privacy) == set(PrivacyReport.__dataclass_fields__)
    assert privacy["dp_enabled"] is True and privacy["private"] is True
    assert privacy["privacy_unit"] == "image" and privacy["noise"].startswith("os-entropy")
    assert 8.0 - 0.05 <= privacy["epsilon"] <= 8.0
    assert privacy["delta"] == 1e-5
    assert privacy["noise_multiplier"] > 0
    assert privacy["max_grad_norm"] == 1.0
    assert privacy["accountant"] == "prv"
    assert report["ledger"]["spent_epsilon"] == pytest.approx(privacy["epsilon"])
    assert report["ledger"]["budget_epsilon"] == 10.0
    assert "public calibration pairs" in report["standardisation"]["fitted_on"]

    diagnostics = json.loads((workdir / DIAGNOSTICS_FILE).read_text())
    assert diagnostics["notice"].startswith("LOCAL DIAGNOSTICS - NOT FOR RELEASE")
    assert diagnostics["train_pairs"] + diagnostics["held_out_pairs"] == PAIRS
    units = diagnostics["units"]
    assert units < diagnostics["train_pairs"]  # several pairs per image: one unit each
    # Opacus: sample_rate = 1 / ceil(units / 16), int(1 / rate) Poisson batches per epoch, over units.
    assert privacy["sample_rate"] == pytest.approx(1 / -(-units // 16))
    assert privacy["steps"] == 2 * int(1 / privacy["sample_rate"])
    assert len(diagnostics["loss_history"]) == 2


def test_public_report_holds_no_loss_count_or_timing(first_run: FirstRun) -> None:
    report = json.loads((first_run.workdir / REPORT_FILE).read_text())
    keys = all_keys(report)
    for private in ("loss", "loss_history", "seconds", "pairs", "units", "train_pairs", "held_out_pairs",
                    "validation_pairs", "n_pairs", "held_out_pairwise_accuracy"):
        assert private not in keys
    assert not any("loss" in key or "second" in key for key in keys)


def test_the_workdir_and_the_local_diagnostics_are_for_the_silos_account_only(first_run: FirstRun) -> None:
    """The diagnostics are exact statistics of the private data (NOT FOR RELEASE), like the ledger beside them."""
    modes = {name: stat.S_IMODE((first_run.workdir / name).stat().st_mode) for name in (DIAGNOSTICS_FILE, LEDGER_FILE)}
    assert modes == {DIAGNOSTICS_FILE: 0o600, LEDGER_FILE: 0o600}
    assert stat.S_IMODE(first_run.workdir.stat().st_mode) == 0o700


def test_train_without_init_is_refused_and_creates_nothing(silo_dir: Path, capsys) -> None:
    config = silo_dir / "uninitialised.yaml"
    config.write_text(SILO_YAML.replace("workdir: work/hospital-a", "workdir: work/uninitialised"), encoding="utf-8")
    assert main(["silo", "train", "--config", str(config), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "restore it from backup" in err.lower() and "mor silo init" in err
    assert not (silo_dir / "work" / "uninitialised").exists()


def test_init_refuses_an_existing_ledger(first_run: FirstRun, capsys) -> None:
    before = (first_run.workdir / LEDGER_FILE).read_bytes()
    assert main(["silo", "init", "--config", str(first_run.config)]) == 1
    err = capsys.readouterr().err
    assert "mor silo: error:" in err and "add --force-new-ledger" in err and "PrivacyLedger(" not in err
    assert (first_run.workdir / LEDGER_FILE).read_bytes() == before


def test_first_run_charges_the_ledger_once(first_run: FirstRun) -> None:
    ledger = silo_training.open_ledger(silo_training.load_silo_config(first_run.config))
    report = json.loads((first_run.workdir / REPORT_FILE).read_text())
    (charge,) = ledger.charges
    assert charge.purpose == "train:reward-model:small_cnn" and charge.settled
    assert (charge.reserved_epsilon, charge.reserved_delta) == (8.0, 1e-5)
    assert charge.epsilon == report["privacy"]["epsilon"]
    assert charge.delta == 1e-5
    assert charge.details["steps"] == report["privacy"]["steps"]
    assert ledger.open_reservations == ()


def test_saved_model_loads_with_the_reported_standardisation(first_run: FirstRun, consortium) -> None:
    model = load_reward_model(first_run.workdir / MODEL_DIR)
    report = json.loads((first_run.workdir / REPORT_FILE).read_text())
    assert model.architecture == "small_cnn"
    assert model.standardisation.mean == report["standardisation"]["mean"]
    assert model.standardisation.std == report["standardisation"]["std"]
    _, splits = consortium
    record = splits.test[0]
    scores = model.score([record.image_path] * 2, [record.question] * 2, [record.answer, "no"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_ledger_command_prints_remaining_budget(first_run: FirstRun) -> None:
    code, out, err = run_cli(["silo", "ledger", "--config", str(first_run.config)])
    assert code == 0, err
    lines = out.splitlines()  # for people: one line per figure and per charge
    assert lines[0].startswith("privacy ledger of silo hospital-a: ") and lines[1] == "  budget     epsilon 10, delta 2e-05"
    assert lines[4] == "  1 charge(s):" and "train:reward-model:small_cnn" in lines[5] and lines[5].endswith("settled")
    code, out, err = run_cli(["silo", "ledger", "--config", str(first_run.config), "--json"])
    assert code == 0, err
    shown = json.loads(out)
    spent = silo_training.open_ledger(silo_training.load_silo_config(first_run.config)).charges[0].epsilon
    assert shown["budget"] == {"epsilon": 10.0, "delta": 2e-5}
    assert shown["spent"]["epsilon"] == pytest.approx(spent)
    assert shown["remaining"]["epsilon"] == pytest.approx(10.0 - spent)
    assert shown["remaining"]["delta"] == pytest.approx(2e-5 - 1e-5)
    assert len(shown["charges"]) == 1 and shown["charges"][0]["purpose"] == "train:reward-model:small_cnn"
    assert shown["charges"][0]["settled"] is True


def test_second_run_over_budget_is_refused_and_changes_nothing(first_run: FirstRun, capsys) -> None:
    assert first_run.exit_code == 0
    workdir = first_run.workdir
    before = snapshot(workdir)
    spent = silo_training.open_ledger(silo_training.load_silo_config(first_run.config)).charges[0].epsilon
    capsys.readouterr()
    # Same YAML: budget 10 with ~8 spent cannot cover another run targeting 8.
    code = main(["silo", "train", "--config", str(first_run.config), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.startswith("mor silo: error: privacy budget exceeded")
    assert "requested epsilon=8" in captured.err
    assert f"already spent epsilon={spent:g} of 10" in captured.err
    assert f"remaining {10.0 - spent:g}" in captured.err
    assert "reward model:" not in captured.out
    assert len(silo_training.open_ledger(silo_training.load_silo_config(first_run.config)).charges) == 1
    # Nothing written: ledger, report and model keep their bytes and mtimes.
    after = snapshot(workdir)
    assert after.keys() == before.keys()
    assert after == before


def test_unknown_key_is_refused_naming_the_file(silo_dir: Path, capsys) -> None:
    bad = silo_dir / "typo.yaml"
    bad.write_text(SILO_YAML + "learning_rat: 0.1\n", encoding="utf-8")
    assert main(["silo", "train", "--config", str(bad), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mor silo: error:")
    assert str(bad) in err
    assert "learning_rat" in err


def test_lora_vlm_without_base_model_is_refused(silo_dir: Path, capsys) -> None:
    bad = silo_dir / "lora.yaml"
    bad.write_text(SILO_YAML.replace("architecture: small_cnn", "architecture: lora_vlm")
                   .replace("workdir: work/hospital-a", "workdir: work/lora"), encoding="utf-8")
    assert main(["silo", "train", "--config", str(bad), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "base_model" in err
    assert str(bad) in err
    assert not (silo_dir / "work" / "lora").exists()


def test_missing_config_file_is_refused(silo_dir: Path, capsys) -> None:
    missing = silo_dir / "nope.yaml"
    assert main(["silo", "ledger", "--config", str(missing)]) == 1
    assert f"{missing}: config file not found" in capsys.readouterr().err


def test_top_level_usage_and_exit_codes(capsys) -> None:
    assert main([]) == 2
    usage = capsys.readouterr().out
    assert usage.startswith("usage: mor <group>") and "silo" in usage and "coordinator" in usage
    assert main(["--help"]) == 0
    assert "usage: mor <group>" in capsys.readouterr().out
    assert main(["no-such-group"]) == 2
    assert "unknown group 'no-such-group'" in capsys.readouterr().err
    for port, says in (("70000", "a port is 0 to 65535"), ("ab", "a port is a whole number")):
        assert main(["silo", "serve", "--config", "silo.yaml", "--port", port]) == 2
        assert f"argument --port: {says}" in capsys.readouterr().err


def exit_code(argv: list[str]) -> int:
    """main's return value, or the code of the SystemExit argparse raises for --help / usage errors."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_group_help_and_missing_command(capsys) -> None:
    assert exit_code(["silo", "--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert exit_code(["silo"]) == 2
    assert "mor silo" in capsys.readouterr().err
    assert exit_code(["silo", "train"]) == 2
    assert "--config" in capsys.readouterr().err


def test_served_standardisation_does_not_depend_on_private_held_out_pairs(silo_dir: Path, monkeypatch) -> None:
    """Same training pairs and seeded noise, other private held-out pairs: the same served scores."""
    seeded = SILO_YAML.replace("    accountant: prv\n", "    accountant: prv\n    insecure_seeded_noise: 3\n")
    original_split = silo_training.split_silo_pairs
    standardisations, accuracies = [], []
    for variant in range(2):
        config_path = silo_dir / f"standardisation-{variant}.yaml"
        config_path.write_text(seeded.replace("workdir: work/hospital-a", f"workdir: work/std-{variant}"),
                               encoding="utf-8")
        with pytest.warns(UserWarning, match="DP noise is SEEDED.*NOT private"):
            config = silo_training.load_silo_config(config_path)
        silo_training.create_ledger(config)

        def split(config, spec, splits, variant=variant):
            train, held_out = original_split(config, spec, splits)
            # Variant 1 holds out other pairs: the held-out answers swapped (what a private set could be).
            if variant:
                held_out = [type(p)(**{**vars(p), "chosen": p.rejected, "rejected": p.chosen}) for p in held_out]
            return train, held_out

        monkeypatch.setattr(silo_training, "split_silo_pairs", split)
        outcome = silo_training.train_silo(config, progress=False)
        standardisations.append(outcome.model.standardisation)
        accuracies.append(json.loads(outcome.diagnostics_path.read_text())["held_out_pairwise_accuracy"])
        assert json.loads(outcome.report_path.read_text())["privacy"]["noise"] == "seeded: not private"
        (charge,) = silo_training.open_ledger(config).charges
        assert charge.details["noise"] == "seeded: not private" and charge.details["private"] is False
    assert accuracies[0] != accuracies[1]  # the held-out set really changed...
    assert standardisations[0] == standardisations[1]  # ...and what is served did not


def test_two_trainings_with_the_same_seed_give_different_weights(silo_dir: Path) -> None:
    """The config seed sets initialisation and data order only: the DP noise differs on every run."""
    scorers = []
    for run in range(2):
        config = silo_dir / f"same-seed-{run}.yaml"
        config.write_text(SILO_YAML.replace("workdir: work/hospital-a", f"workdir: work/same-seed-{run}"),
                          encoding="utf-8")
        for command in (["init"], ["train", "--no-progress"]):
            code, _, err = run_cli(["silo", command[0], "--config", str(config), *command[1:]])
            assert code == 0, err
        scorers.append((silo_dir / "work" / f"same-seed-{run}" / MODEL_DIR / "scorer.safetensors").read_bytes())
        charge = silo_training.open_ledger(silo_training.load_silo_config(config)).charges[0]
        assert charge.details["noise"].startswith("os-entropy") and charge.details["private"] is True
    assert scorers[0] != scorers[1]


def test_a_job_refused_before_dp_sgd_releases_its_reservation(silo_dir: Path, capsys) -> None:
    """A config error found after the reservation (batch larger than the data) spends nothing."""
    config = silo_dir / "too-big-batch.yaml"
    config.write_text(SILO_YAML.replace("workdir: work/hospital-a", "workdir: work/too-big-batch")
                      .replace("batch_size: 16", "batch_size: 100000"), encoding="utf-8")
    assert main(["silo", "init", "--config", str(config)]) == 0
    assert main(["silo", "train", "--config", str(config), "--no-progress"]) == 1
    assert "must be smaller than the number of privacy units" in capsys.readouterr().err
    ledger = silo_training.open_ledger(silo_training.load_silo_config(config))
    (charge,) = ledger.charges
    assert charge.settled and (charge.epsilon, charge.delta) == (0.0, 0.0)
    assert charge.details["outcome"].startswith("released unspent")
    assert ledger.remaining_epsilon == 10.0


def test_the_served_model_never_answers_from_the_training_feature_cache(silo_dir: Path) -> None:
    """A frozen_encoders silo's training cache holds every private image's features: a served model reading it
    would answer those from the cache (fast) and others after an encoder pass (slow), telling the caller which
    images are the silo's. Served, a private image is encoded afresh into the served model's own cache."""
    config_path = silo_dir / "frozen.yaml"
    config_path.write_text(SILO_YAML.replace("architecture: small_cnn", "architecture: frozen_encoders")
                           .replace("workdir: work/hospital-a", "workdir: work/frozen"), encoding="utf-8")
    config = silo_training.load_silo_config(config_path)
    private, outsider = (silo_dir / "private.png", silo_dir / "outsider.png")
    for path, colour in ((private, "red"), (outsider, "blue")):
        Image.new("RGB", (64, 64), colour).save(path)
    trained = FrozenEncoderRewardModel(cache_dir=silo_training.feature_cache_dir(config))
    trained.image_encoder.encode([private])  # what training leaves behind: the private image's features
    trained.save(config.workdir / MODEL_DIR)
    training_cache = next(silo_training.feature_cache_dir(config).iterdir())
    before = training_cache.read_bytes()

    service = load_service(config, SiloPolicy(), ledger=None)
    service.score(ScoreRequest(images=tuple(ImageBlob.of(p.read_bytes()) for p in (private, outsider)),
                               rows=(ScoreRow(0, "what colour is it?", "red"), ScoreRow(1, "what colour is it?", "blue")),
                               objective="correct"))

    assert training_cache.read_bytes() == before  # never read into the served model, never written by it
    (served,) = silo_training.served_feature_cache_dir(config).iterdir()
    assert set(torch.load(served, weights_only=True)) == {image_key(private), image_key(outsider)}



@pytest.mark.parametrize("cache", ["work/frozen/served_feature_cache", "work/frozen",
                                   "work/frozen/served_feature_cache/x"])
def test_a_training_cache_in_the_served_cache_is_refused(silo_dir: Path, capsys, cache: str) -> None:
    """The served cache must only hold what callers sent, or a cache hit's latency tells them an image is private."""
    config_path = silo_dir / "frozen-shared-cache.yaml"
    config_path.write_text(SILO_YAML.replace("architecture: small_cnn",
                                             f"architecture: frozen_encoders\nfeature_cache: {cache}")
                           .replace("workdir: work/hospital-a", "workdir: work/frozen"), encoding="utf-8")
    config = silo_training.load_silo_config(config_path)
    for where in (silo_training.feature_cache_dir, silo_training.served_feature_cache_dir):
        with pytest.raises(ValueError, match="the served model's cache"):
            where(config)


def test_a_silo_the_consortium_does_not_name_gets_no_ledger_and_one_clear_line(silo_dir: Path, capsys) -> None:
    config_path = silo_dir / "nobody.yaml"
    config_path.write_text(SILO_YAML.replace("name: hospital-a", "name: nobody")
                           .replace("workdir: work/hospital-a", "workdir: work/nobody"), encoding="utf-8")
    assert main(["silo", "init", "--config", str(config_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("mor silo: error: no silo 'nobody' in the consortium; known silos: "
                           "['hospital-a', 'bank-b', 'hospital-c']"), err
    assert not (silo_dir / "work" / "nobody").exists()


def test_without_a_policy_file_the_silo_admits_its_own_consortiums_coordinator(silo_dir: Path, tmp_path: Path) -> None:
    """The defaults once named mor://coordinator/coordinator whatever the consortium called its coordinator."""
    from silo_agent.serving import serving_policy

    consortium = tmp_path / "consortium.yaml"
    consortium.write_text((silo_dir / "consortium.yaml").read_text(encoding="utf-8")
                          + "coordinator: central\nauditors: [regulator]\n", encoding="utf-8")
    config_path = tmp_path / "silo.yaml"
    config_path.write_text(SILO_YAML.replace("consortium: consortium.yaml", f"consortium: {consortium}")
                           + "serve:\n  kit: kit\n", encoding="utf-8")
    policy, source = serving_policy(silo_training.load_silo_config(config_path))
    assert policy.allowed_callers["Score"] == ["mor://coordinator/central"]
    assert policy.allowed_callers["Describe"] == ["mor://coordinator/central", "mor://auditor/regulator"]
    assert "for coordinator 'central'" in source
    assert SiloPolicy().allowed_callers["Score"] == ["mor://coordinator/coordinator"]  # the consortium file's default

    # A policy file that only tightens a limit keeps the consortium's callers; one that names callers is obeyed.
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text("daily_cap: 5000\n", encoding="utf-8")
    config_path.write_text(config_path.read_text(encoding="utf-8") + f"  policy: {policy_path}\n", encoding="utf-8")
    policy, source = serving_policy(silo_training.load_silo_config(config_path))
    assert (policy.daily_cap, policy.allowed_callers["Score"]) == (5000, ["mor://coordinator/central"])
    assert str(policy_path) in source and "for coordinator 'central'" in source
    policy_path.write_text("allowed_callers:\n  Score: [mor://coordinator/central]\n", encoding="utf-8")
    policy, source = serving_policy(silo_training.load_silo_config(config_path))
    assert policy.allowed_callers == {"Score": ["mor://coordinator/central"]} and source == str(policy_path)


def test_a_policy_listing_a_caller_whose_role_may_never_call_the_rpc_is_refused_when_loaded(
        silo_dir: Path, tmp_path: Path) -> None:
    """It loaded, and the roles table refused the caller on every call (PERMISSION_DENIED): the operator learnt of
    the mistake only from refused calls."""
    from silo_agent.serving import serving_policy

    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text("allowed_callers:\n  Score: [mor://coordinator/coordinator, mor://auditor/auditor]\n"
                           "  Describe: [mor://silo/bank-b]\n", encoding="utf-8")
    config_path = tmp_path / "silo.yaml"
    consortium = f"consortium: {silo_dir / 'consortium.yaml'}"
    config_path.write_text(SILO_YAML.replace("consortium: consortium.yaml", consortium)
                           + f"serve:\n  kit: kit\n  policy: {policy_path}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"allowed_callers.Score lists mor://auditor/auditor, but only coordinator "
                       r"parties may call Score on a silo"):
        serving_policy(silo_training.load_silo_config(config_path))
    policy_path.write_text("allowed_callers:\n  Describe: [mor://silo/bank-b]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"allowed_callers.Describe lists mor://silo/bank-b, but only auditor or "
                       r"coordinator parties may call Describe"):
        serving_policy(silo_training.load_silo_config(config_path))
    policy_path.write_text("allowed_callers:\n  Describe: [mor://auditor/auditor]\n", encoding="utf-8")
    assert serving_policy(silo_training.load_silo_config(config_path))[0].allowed_callers == {
        "Describe": ["mor://auditor/auditor"]}


def test_a_privacy_report_is_served_only_beside_the_weights_it_describes(first_run: FirstRun, tmp_path: Path,
                                                                          caplog) -> None:
    """A job stopped between writing its model and its report (or failing to write the report) must not leave
    the previous run's claim published beside the new weights."""
    from silo_agent.service import open_model_service

    workdir = tmp_path / "work"
    shutil.copytree(first_run.workdir, workdir)
    model_dir, report_path = workdir / MODEL_DIR, workdir / REPORT_FILE
    served = open_model_service("hospital-a", model_dir).describe().privacy_report
    assert served is not None and served.epsilon == json.loads(report_path.read_text())["privacy"]["epsilon"]

    original = (model_dir / "scorer.safetensors").read_bytes()
    (model_dir / "scorer.safetensors").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # other weights
    with pytest.raises(ValueError, match="does not describe the weights"):
        open_model_service("hospital-a", model_dir)
    (model_dir / "scorer.safetensors").write_bytes(original)

    complete = report_path.read_text()
    report_path.write_text(complete[: len(complete) // 2])  # a report cut short
    with pytest.raises(ValueError, match="not a complete privacy report"):
        open_model_service("hospital-a", model_dir)

    # A report from before reports named their weights: not refused (it was true when written), not published.
    older = json.loads(complete)
    del older["model_digest"]
    report_path.write_text(json.dumps(older))
    with caplog.at_level(logging.WARNING, logger="silo_agent.service"):
        assert open_model_service("hospital-a", model_dir).describe().privacy_report is None
    assert "names no model_digest" in caplog.text and "train again" in caplog.text

    report_path.unlink()  # what a job stopped after its model leaves: no claim at all, said loudly when served
    config = silo_training.load_silo_config(first_run.config).model_copy(update={"workdir": workdir})
    with caplog.at_level(logging.WARNING, logger="silo_agent.serving"):
        assert load_service(config, SiloPolicy(), ledger=None).describe().privacy_report is None
    assert "callers get no privacy claim" in caplog.text
