"""The simulation-only baselines (`mor_cli.baselines`): FedAvg of DP reward models and a centralised model.

Tiny settings: small_cnn with 5 public pre-training steps, the small consortium
of conftest (120 pairs per silo), expected batch 32, rdp accounting (the PRV
noise search takes seconds per call on 2 cores). The silos hold back different
validation shares so that pair-weighted and plain averages differ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from mor_cli.baselines import (
    REPORT_FILE,
    CentralizedSettings,
    FedAvgSettings,
    silo_configs_from_paths,
    train_centralized_reward_model,
    train_fedavg_reward_model,
)
from mor_cli.fedavg import plan_fedavg_noise, trainable_state, weighted_average
from mor_secure.data import pairs_for_silo
from mor_secure.data.preferences import silo_seed
from mor_secure.models import load_reward_model
from mor_secure.models.reward_architectures import SmallCNNRewardModel
from mor_secure.privacy import DPConfig, TrainingConfig, epsilon_spent
from mor_secure.privacy.privacy_units import held_out_units
from silo_agent.training import LEDGER_FILE

SILO_YAML = """\
name: {name}
consortium: consortium.yaml
workdir: work/{name}
architecture: small_cnn
validation_fraction: {validation_fraction}
public_pretraining_steps: 5
training:
  epochs: 2
  batch_size: 16
  dp:
    target_epsilon: 8.0
    target_delta: 1.0e-5
    accountant: rdp
"""
# 120 pairs each (3 kinds x max_pairs_per_kind 40); each silo holds back this share of its images.
VALIDATION_FRACTIONS = {"hospital-a": 0.1, "bank-b": 0.2, "hospital-c": 0.3}
PAIRS_PER_SILO = 120
PRETRAINING_STEPS, SEED = 5, 3


def write_silos(directory: Path, consortium_path: Path) -> list[Path]:
    shutil.copy(consortium_path, directory / "consortium.yaml")
    paths = []
    for name, fraction in VALIDATION_FRACTIONS.items():
        path = directory / f"{name}.yaml"
        path.write_text(SILO_YAML.format(name=name, validation_fraction=fraction), encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def silo_configs(tmp_path_factory: pytest.TempPathFactory, consortium_path: Path):
    return silo_configs_from_paths(write_silos(tmp_path_factory.mktemp("silos"), consortium_path))


@pytest.fixture(scope="module")
def train_pairs(silo_configs, consortium) -> dict[str, int]:
    """Training pairs per silo: its pairs minus those on held-back images (`held_out_units`, tested on its own)."""
    spec, splits = consortium
    counts = {}
    for config in silo_configs:
        pairs = pairs_for_silo(splits, spec, config.name)
        held_back = held_out_units({p.image_id for p in pairs}, fraction=config.validation_fraction,
                                   salt=f"{silo_seed(spec.seed, config.name)}/held-out")
        counts[config.name] = sum(1 for p in pairs if p.image_id not in held_back)
    return counts


@pytest.fixture(scope="module")
def fedavg(silo_configs, tmp_path_factory: pytest.TempPathFactory):
    settings = FedAvgSettings(rounds=2, local_epochs=1, batch_size=32, public_pretraining_steps=PRETRAINING_STEPS,
                              seed=SEED)
    return train_fedavg_reward_model(silo_configs, tmp_path_factory.mktemp("fedavg") / "model", settings,
                                     progress=False)


def test_weighted_average_is_the_weighted_mean_key_by_key() -> None:
    states = [{"w": torch.tensor([0.0, 4.0]), "b": torch.tensor([1.0])},
              {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([5.0])}]
    out = weighted_average(states, [1, 3])
    assert torch.equal(out["w"], torch.tensor([3.0, 7.0]))
    assert torch.equal(out["b"], torch.tensor([4.0]))
    assert out["w"].dtype == torch.float32
    with pytest.raises(ValueError, match="different parameters"):
        weighted_average([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="> 0"):
        weighted_average(states, [1, 0])
    with pytest.raises(ValueError, match="one weight per state"):
        weighted_average(states, [1])


def test_fedavg_model_loads_with_reported_standardisation(fedavg, consortium, train_pairs) -> None:
    model = load_reward_model(fedavg.model_dir)
    report = json.loads(fedavg.report_path.read_text())
    assert fedavg.report_path.parent == fedavg.model_dir
    assert model.architecture == "small_cnn"
    assert (model.standardisation.mean, model.standardisation.std) == (
        report["standardisation"]["mean"], report["standardisation"]["std"])
    assert report["baseline"] == "fedavg" and report["rounds"] == 2 and len(report["round_losses"]) == 2
    assert {n: s["train_pairs"] for n, s in report["silos"].items()} == train_pairs
    assert fedavg.train_pairs == train_pairs
    assert all(n < PAIRS_PER_SILO for n in train_pairs.values()) and len(set(train_pairs.values())) == 3
    _, splits = consortium
    record = splits.test[0]
    scores = model.score([record.image_path] * 2, [record.question] * 2, [record.answer, "no"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_fedavg_keeps_the_publicly_pretrained_trunk(fedavg, consortium) -> None:
    _, splits = consortium
    reference = SmallCNNRewardModel(seed=SEED)
    reference.pretrain(splits.sft, steps=PRETRAINING_STEPS, seed=SEED)
    trunk = load_reward_model(fedavg.model_dir).trunk.state_dict()
    expected = reference.trunk.state_dict()
    assert trunk.keys() == expected.keys()
    assert all(torch.equal(trunk[k], expected[k]) for k in trunk)


def test_global_weights_are_the_pair_weighted_mean_of_the_last_round(fedavg, train_pairs) -> None:
    names = list(train_pairs)
    local = [fedavg.last_round_local_states[n] for n in names]
    saved = trainable_state(load_reward_model(fedavg.model_dir).module)
    expected = weighted_average(local, [train_pairs[n] for n in names])
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    # Not trivially so: the silos' local weights differ, and pair weighting differs from a plain mean.
    key = next(iter(saved))
    assert not torch.equal(local[0][key], local[1][key])
    assert not torch.allclose(saved[key], weighted_average(local, [1, 1, 1])[key])


def test_fedavg_spends_at_most_each_silos_target_and_charges_no_ledger(fedavg, silo_configs) -> None:
    report = json.loads(fedavg.report_path.read_text())
    for config in silo_configs:
        privacy = report["silos"][config.name]["privacy"]
        rounds = privacy["rounds"]
        assert len(rounds) == 2 and len({r["noise_multiplier"] for r in rounds}) == 1
        # Recomputed from what ran: one noise and rate, all rounds' steps together.
        recomputed = epsilon_spent(noise_multiplier=rounds[0]["noise_multiplier"],
                                   sample_rate=rounds[0]["sample_rate"], steps=sum(r["steps"] for r in rounds),
                                   delta=1e-5, accountant="rdp")
        assert fedavg.epsilon[config.name] == pytest.approx(recomputed)
        assert privacy["epsilon"] == pytest.approx(recomputed)
        assert 8.0 - 0.1 <= fedavg.epsilon[config.name] <= 8.0
        # Each round alone spends much less than the target: the noise is planned for both rounds.
        assert all(r["epsilon"] < 8.0 - 1.0 for r in rounds)
        assert privacy["charged_to_ledger"] is False
        assert privacy["covers"].startswith("the silo's DP-SGD local updates only, not the averaged model")
        assert not (config.workdir / LEDGER_FILE).exists()


def test_centralized_pools_every_silos_training_pairs(silo_configs, train_pairs, tmp_path: Path) -> None:
    settings = CentralizedSettings(public_pretraining_steps=PRETRAINING_STEPS, training=TrainingConfig(
        epochs=1, batch_size=32, learning_rate=5e-3, dp=DPConfig(enabled=False)))
    with pytest.warns(UserWarning, match="WITHOUT differential privacy"):
        outcome = train_centralized_reward_model(silo_configs, tmp_path / "central", settings, progress=False)
    # Every silo's pairs minus those on the images it holds back, counted independently of the module.
    assert outcome.train_pairs == train_pairs
    assert outcome.report.dp_enabled is False
    report = json.loads((tmp_path / "central" / REPORT_FILE).read_text())
    assert report["train_pairs"] == train_pairs and report["privacy"]["epsilon"] is None
    assert load_reward_model(tmp_path / "central").architecture == "small_cnn"


def test_centralized_default_is_dp_off_with_a_loud_warning() -> None:
    with pytest.warns(UserWarning, match="DP is OFF"):
        settings = CentralizedSettings()
    assert settings.training.dp.enabled is False and settings.architecture == "small_cnn"
    with pytest.raises(ValidationError, match="base_model"):
        CentralizedSettings(architecture="lora_vlm", training=TrainingConfig())


def test_fedavg_settings_refuse_lora_vlm_and_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="small_cnn or frozen_encoders"):
        FedAvgSettings(architecture="lora_vlm")
    with pytest.raises(ValidationError, match="extra"):
        FedAvgSettings(local_epoch=3)


def test_silos_of_different_consortia_are_refused(tmp_path: Path, consortium_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_silos(tmp_path / "a", consortium_path)[0]
    second = write_silos(tmp_path / "b", consortium_path)[1]
    with pytest.raises(ValueError, match="same consortium YAML"):
        silo_configs_from_paths([first, second])
    with pytest.raises(ValueError, match="repeat"):
        silo_configs_from_paths([first, first])


@pytest.mark.parametrize("baseline", ["fedavg", "centralized"])
def test_a_silo_with_its_own_data_is_refused_before_its_file_is_read(baseline: str, tmp_path: Path,
                                                                     consortium_path: Path) -> None:
    """The baselines pool every silo's pairs in one process with no ledger charge: never a silo's real data."""
    paths = write_silos(tmp_path, consortium_path)
    own = paths[1]
    (tmp_path / "images").mkdir()
    # Unreadable on purpose: a baseline that opened it would fail with DataImportError, not this refusal.
    (tmp_path / "pairs.jsonl").write_text("not json\n", encoding="utf-8")
    own.write_text(own.read_text(encoding="utf-8").replace("    accountant: rdp\n", "    accountant: rdp\n"
                                                             "    public_unit_count: 100\n")
                   + "data:\n  pairs: pairs.jsonl\n  images: images\n", encoding="utf-8")
    configs = silo_configs_from_paths(paths)
    train, settings = ((train_fedavg_reward_model, FedAvgSettings()) if baseline == "fedavg" else
                       (train_centralized_reward_model, CentralizedSettings(training=TrainingConfig())))
    with pytest.raises(ValueError, match=r"bank-b.*own data.*simulation") as refused:
        train(configs, tmp_path / "out", settings, progress=False)
    assert type(refused.value) is ValueError
    assert not (tmp_path / "out").exists()


def test_fedavg_plans_its_rounds_over_the_public_unit_count_as_a_silos_run_is_planned() -> None:
    """Each round's train_bradley_terry plans from dp.public_unit_count; a FedAvg plan from the actual count
    would not be the run's (512 units, batch 256: rate 1/2 and 2 steps, against the run's 1/4 and 4)."""
    plan = plan_fedavg_noise(n_units=512, batch_size=256, rounds=2, local_epochs=1,
                             dp=DPConfig(public_unit_count=1000))
    assert (plan.sample_rate, plan.steps_per_round) == (1 / 4, 4)


def test_fedavg_refuses_a_batch_not_below_a_silos_public_unit_count_before_building_a_model(
        tmp_path: Path, consortium_path: Path) -> None:
    paths = write_silos(tmp_path, consortium_path)
    paths[0].write_text(paths[0].read_text(encoding="utf-8").replace("    accountant: rdp\n",
                                                                       "    accountant: rdp\n    public_unit_count: 20\n"),
                        encoding="utf-8")
    with pytest.raises(ValueError, match=r"batch_size 32 is not below silo hospital-a's 20 training units"):
        train_fedavg_reward_model(silo_configs_from_paths(paths), tmp_path / "out", FedAvgSettings(batch_size=32),
                                  progress=False)
    assert not (tmp_path / "out").exists()
