"""`mor silo train` on the operator's own preference file (`data:` in the silo YAML), end to end through the CLI.

The file is built from easy-VQA images copied under an image root, 2 pairs
per image, 3 images per patient (`unit_id`), so the privacy unit is the
patient: 15 patients, 90 pairs (the consortium's partition would give
hospital-a 120).
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mor_cli.main import main
from mor_secure.data import DataImportError, make_pairs
from silo_agent import training as silo_training
from silo_agent.training import DIAGNOSTICS_FILE, MODEL_DIR, REPORT_FILE, TRAINING_LOCK_FILE

PATIENTS, IMAGES_PER_PATIENT, PAIRS_PER_IMAGE = 15, 3, 2

OWN_DATA_YAML = """\
name: hospital-a
consortium: consortium.yaml
workdir: {workdir}
architecture: small_cnn
public_pretraining_steps: 5
data:
  pairs: {pairs}
  images: images
training:
  epochs: 2
  batch_size: 4
  learning_rate: 0.005
  dp:
    target_epsilon: 8.0
    target_delta: 1.0e-5
    public_unit_count: 15
privacy_budget:
  epsilon: 10.0
  delta: 2.0e-5
"""


@pytest.fixture(scope="module")
def own_data(tmp_path_factory: pytest.TempPathFactory, consortium_path: Path, consortium) -> Path:
    """A silo directory: the consortium file, `images/` and `pairs.jsonl` (relative paths, as an operator writes)."""
    _, splits = consortium
    directory = tmp_path_factory.mktemp("own-data")
    shutil.copy(consortium_path, directory / "consortium.yaml")
    (directory / "images").mkdir()
    by_image: dict[Path, list] = {}
    for record in splits.private["hospital-a"]:
        by_image.setdefault(record.image_path, []).append(record)
    chosen_images = [image for image, records in by_image.items()
                     if len(records) >= PAIRS_PER_IMAGE][:PATIENTS * IMAGES_PER_PATIENT]
    rows = []
    for index, image in enumerate(chosen_images):
        shutil.copy(image, directory / "images" / f"scan-{index}.png")
        for pair in make_pairs(by_image[image][:PAIRS_PER_IMAGE], seed=index):
            rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                         "images": [f"scan-{index}.png"], "kind": pair.kind,
                         "unit_id": f"patient-{index // IMAGES_PER_PATIENT}"})
    (directory / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return directory


def silo_yaml(directory: Path, name: str, pairs: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(OWN_DATA_YAML.format(workdir=f"work/{name}", pairs=pairs), encoding="utf-8")
    assert main(["silo", "init", "--config", str(path)]) == 0
    return path


def test_a_silo_trains_on_its_own_file_with_the_patient_as_the_privacy_unit(own_data: Path, capsys) -> None:
    config = silo_yaml(own_data, "own", "pairs.jsonl")
    assert main(["silo", "train", "--config", str(config), "--no-progress"]) == 0, capsys.readouterr().err
    assert " per patient " in capsys.readouterr().out
    workdir = own_data / "work" / "own"
    diagnostics = json.loads((workdir / DIAGNOSTICS_FILE).read_text())
    pairs_per_patient = IMAGES_PER_PATIENT * PAIRS_PER_IMAGE
    assert diagnostics["train_pairs"] + diagnostics["held_out_pairs"] == PATIENTS * pairs_per_patient
    # Held back and trained on whole patients: one DP unit per patient, never an image of one on each side.
    assert diagnostics["held_out_pairs"] % pairs_per_patient == 0 and diagnostics["held_out_pairs"] > 0
    assert diagnostics["units"] == diagnostics["train_pairs"] // pairs_per_patient
    privacy = json.loads((workdir / REPORT_FILE).read_text())["privacy"]
    assert privacy["privacy_unit"] == "patient" and privacy["private"] is True
    assert privacy["sample_rate"] == pytest.approx(1 / -(-diagnostics["units"] // 4))
    (charge,) = silo_training.open_ledger(silo_training.load_silo_config(config)).charges
    assert charge.settled and charge.epsilon == privacy["epsilon"] > 0
    assert charge.privacy_unit == charge.details["privacy_unit"] == "patient"  # reserved and settled
    assert (workdir / MODEL_DIR / "reward_model.json").is_file()


def test_a_silo_of_too_few_units_to_hold_one_back_trains_and_says_it_has_no_held_out_accuracy(
        own_data: Path, capsys, caplog) -> None:
    """Each patient is held back on its own id (no fallback unit: it broke pair-level neighbours); at a share of
    0.001 none of the 15 is, and the diagnostics said NaN, which is not JSON."""
    config = own_data / "few-units.yaml"
    config.write_text(OWN_DATA_YAML.format(workdir="work/few-units", pairs="pairs.jsonl").replace(
        "public_pretraining_steps: 5\n", "public_pretraining_steps: 5\nvalidation_fraction: 0.001\n"),
        encoding="utf-8")
    assert main(["silo", "init", "--config", str(config)]) == 0
    with caplog.at_level("WARNING", logger="silo_agent.training"):
        assert main(["silo", "train", "--config", str(config), "--no-progress"]) == 0, capsys.readouterr().err
    diagnostics = json.loads((own_data / "work" / "few-units" / DIAGNOSTICS_FILE).read_text(),
                             parse_constant=lambda name: pytest.fail(f"{name} in the diagnostics"))
    assert diagnostics["held_out_pairs"] == 0 and diagnostics["held_out_pairwise_accuracy"] is None
    assert diagnostics["train_pairs"] == PATIENTS * IMAGES_PER_PATIENT * PAIRS_PER_IMAGE
    assert any("no held-out accuracy" in record.getMessage() for record in caplog.records)


def test_pair_level_training_takes_rows_without_a_unit_id_that_a_per_patient_one_refuses(own_data: Path,
                                                                                        consortium) -> None:
    rows = [json.loads(line) for line in (own_data / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    (own_data / "no-units.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in row.items() if k != "unit_id"}) + "\n" for row in rows), encoding="utf-8")
    per_patient = own_data / "no-units-patient.yaml"
    per_patient.write_text(OWN_DATA_YAML.format(workdir="work/no-units", pairs="no-units.jsonl"), encoding="utf-8")
    with pytest.raises(DataImportError, match="no unit_id, but data.unit is patient"):
        silo_training.silo_pairs(silo_training.load_silo_config(per_patient), *consortium)
    per_pair = own_data / "no-units-pair.yaml"
    per_pair.write_text(per_patient.read_text(encoding="utf-8").replace(
        "    target_delta: 1.0e-5\n", "    target_delta: 1.0e-5\n    privacy_unit: pair\n"), encoding="utf-8")
    with pytest.warns(UserWarning, match="privacy_unit is 'pair'"):
        config = silo_training.load_silo_config(per_pair)
    assert len(silo_training.silo_pairs(config, *consortium)) == len(rows)


def test_a_file_with_bad_rows_is_refused_whole_listing_each_and_spends_nothing(own_data: Path, capsys) -> None:
    lines = (own_data / "pairs.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    same = json.loads(lines[2])
    lines[2] = json.dumps({**same, "rejected": same["chosen"]}) + "\n"
    lines[4] = json.dumps({**json.loads(lines[4]), "images": ["../consortium.yaml"]}) + "\n"
    (own_data / "bad.jsonl").write_text("".join(lines), encoding="utf-8")
    config = silo_yaml(own_data, "bad", "bad.jsonl")
    capsys.readouterr()
    assert main(["silo", "train", "--config", str(config), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{own_data / 'bad.jsonl'}: 2 problem(s), nothing imported:" in err
    assert f"{own_data / 'bad.jsonl'}:3: chosen and rejected are the same answer" in err
    assert f"{own_data / 'bad.jsonl'}:5: " in err and "Traceback" not in err
    (charge,) = silo_training.open_ledger(silo_training.load_silo_config(config)).charges
    assert charge.settled and (charge.epsilon, charge.delta) == (0.0, 0.0)
    assert not (own_data / "work" / "bad" / MODEL_DIR).exists()


def test_a_second_training_on_a_busy_workdir_is_refused_before_reserving_and_the_workdir_trains_after(
        own_data: Path, capsys) -> None:
    config = silo_yaml(own_data, "busy", "pairs.jsonl")
    workdir = own_data / "work" / "busy"
    with open(workdir / TRAINING_LOCK_FILE, "a+b") as other_run:  # a training in another process holds this
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert main(["silo", "train", "--config", str(config), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"{workdir}: another `mor silo train` or `mor silo init` is running on this workdir" in err
        assert "Traceback" not in err
        assert silo_training.open_ledger(silo_training.load_silo_config(config)).charges == ()
    assert main(["silo", "train", "--config", str(config), "--no-progress"]) == 0, capsys.readouterr().err
    (charge,) = silo_training.open_ledger(silo_training.load_silo_config(config)).charges
    assert charge.settled and charge.epsilon > 0


def test_the_command_line_says_a_weakened_privacy_warning_once(own_data: Path) -> None:
    # Said as a warning and as a log line (mor_secure.weakened_privacy); a real process, since pytest takes over
    # both the warnings and the root logger of this one. 'pair' is one the command line once printed twice.
    per_pair = own_data / "warned-pair.yaml"
    per_pair.write_text(OWN_DATA_YAML.format(workdir="work/warned-pair", pairs="pairs.jsonl").replace(
        "    target_delta: 1.0e-5\n", "    target_delta: 1.0e-5\n    privacy_unit: pair\n"), encoding="utf-8")
    shown = subprocess.run([sys.executable, "-m", "mor_cli", "silo", "ledger", "--config", str(per_pair)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert shown.stderr.count("privacy_unit is 'pair'") == 1, shown.stderr
