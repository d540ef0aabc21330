"""`mor silo train` / `mor silo ledger` end to end through `mor_cli.main.main(argv)`.

small_cnn is the fastest architecture: 5 public pre-training steps, then 2 DP
epochs over a silo's ~108 pairs at expected batch size 16 (14 noisy steps).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mor_cli.main import main
from mor_secure.models import load_reward_model
from mor_secure.models.reward_architectures.small_cnn import WordsAndHead
from silo_agent.training import LEDGER_FILE, MODEL_DIR, REPORT_FILE

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

# hospital-a holds 3 kinds x 40 pairs (max_pairs_per_kind); validation_fraction 0.1 keeps 12 back.
TRAIN_PAIRS, VALIDATION_PAIRS = 108, 12
# Opacus: sample_rate = 1 / ceil(108 / 16) = 1/7, 7 Poisson batches per epoch.
SAMPLE_RATE, STEPS = 1 / 7, 14


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
    code, out, err = run_cli(["silo", "train", "--config", str(config), "--no-progress"])
    return FirstRun(config, silo_dir / "work" / "hospital-a", code, out, err)


def test_first_run_succeeds_and_writes_model_and_report(first_run: FirstRun) -> None:
    assert first_run.exit_code == 0, first_run.stderr
    workdir = first_run.workdir
    assert f"reward model: {workdir / MODEL_DIR}" in first_run.stdout
    assert f"privacy report: {workdir / REPORT_FILE}" in first_run.stdout
    assert {p.name for p in (workdir / MODEL_DIR).iterdir()} == {"reward_model.json", "trunk.safetensors",
                                                                 "scorer.safetensors"}
    report = json.loads((workdir / REPORT_FILE).read_text())
    assert {"silo", "architecture", "trainable_params", "privacy"} <= set(report)
    assert report["silo"] == "hospital-a"
    assert report["architecture"] == "small_cnn"
    assert report["trainable_params"] == sum(p.numel() for p in WordsAndHead(32, 64, 64).parameters())
    assert (report["train_pairs"], report["validation_pairs"]) == (TRAIN_PAIRS, VALIDATION_PAIRS)
    privacy = report["privacy"]
    assert {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "accountant"} <= set(privacy)
    assert privacy["dp_enabled"] is True
    assert 8.0 - 0.05 <= privacy["epsilon"] <= 8.0 + 1e-9
    assert privacy["delta"] == 1e-5
    assert privacy["noise_multiplier"] > 0
    assert privacy["sample_rate"] == pytest.approx(SAMPLE_RATE)
    assert privacy["steps"] == STEPS
    assert privacy["max_grad_norm"] == 1.0
    assert privacy["accountant"] == "prv"
    assert len(report["loss_history"]) == 2
    assert report["ledger"]["spent_epsilon"] == pytest.approx(privacy["epsilon"])
    assert report["ledger"]["budget_epsilon"] == 10.0


def test_first_run_charges_the_ledger_once(first_run: FirstRun) -> None:
    ledger = json.loads((first_run.workdir / LEDGER_FILE).read_text())
    report = json.loads((first_run.workdir / REPORT_FILE).read_text())
    assert (ledger["epsilon_budget"], ledger["delta_budget"]) == (10.0, 2e-5)
    assert len(ledger["spends"]) == 1
    spend = ledger["spends"][0]
    assert spend["purpose"] == "train:reward-model:small_cnn"
    assert spend["epsilon"] == report["privacy"]["epsilon"]
    assert spend["delta"] == 1e-5
    assert spend["details"]["steps"] == STEPS


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
    shown = json.loads(out)
    spent = json.loads((first_run.workdir / LEDGER_FILE).read_text())["spends"][0]["epsilon"]
    assert shown["budget"] == {"epsilon": 10.0, "delta": 2e-5}
    assert shown["spent"]["epsilon"] == pytest.approx(spent)
    assert shown["remaining"]["epsilon"] == pytest.approx(10.0 - spent)
    assert shown["remaining"]["delta"] == pytest.approx(2e-5 - 1e-5)
    assert len(shown["spends"]) == 1 and shown["spends"][0]["purpose"] == "train:reward-model:small_cnn"


def test_second_run_over_budget_is_refused_and_changes_nothing(first_run: FirstRun, capsys) -> None:
    assert first_run.exit_code == 0
    workdir = first_run.workdir
    before = snapshot(workdir)
    spent = json.loads((workdir / LEDGER_FILE).read_text())["spends"][0]["epsilon"]
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
    ledger = json.loads((workdir / LEDGER_FILE).read_text())
    assert len(ledger["spends"]) == 1
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
