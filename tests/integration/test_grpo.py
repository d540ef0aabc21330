"""GRPO through TRL on the tiny VLM, the reward callables, and the settings' refusals.

The two training tests run real `trl.GRPOTrainer` steps (tiny VLM, 2
prompts x 2 generations, 2-token answers) against a varied text-hash reward,
since an untrained model almost never earns an exact-match point and equal
rewards give zero advantages and hence no policy gradient.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path

import easy_vqa
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from coordinator.grpo import RUN_RECORD, GRPOSettings, grpo_dataset, latest_checkpoint, train_grpo
from coordinator.rewards import (
    EMPTY_COMPLETION_REWARD,
    ConstantReward,
    ExactMatchReward,
    FusedSiloReward,
    SingleSiloReward,
    UniformSiloReward,
)
from coordinator.router import Router, RouterConfig
from coordinator.silo_requests import image_blob
from mor_secure.wire import ScoreReply, ScoreRequest, SiloDescription, SiloError

REPO = Path(__file__).resolve().parents[2]


class TextHashReward:
    """Deterministic, varied reward of the completion text (so advantages are non-zero)."""

    __name__ = "text_hash_reward"

    def __call__(self, prompts, completions, **kwargs):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [zlib.crc32(t.encode()) % 97 / 97 for t in texts]


def tiny_settings(output_dir: Path, **changes) -> GRPOSettings:
    values = dict(output_dir=output_dir, steps=3, num_generations=2, per_device_train_batch_size=4,
                  max_completion_length=2, learning_rate=1e-3, logging_steps=1, save_steps=100)
    return GRPOSettings(**{**values, **changes})


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def grpo_records(consortium):
    _, splits = consortium
    return splits.sft[:24]


# --------------------------------------------------------------------------- training through TRL


def test_grpo_changes_policy_and_logs_kl_to_frozen_reference(tiny_vlm_dir: Path, grpo_records, tmp_path: Path):
    base_files = digest(tiny_vlm_dir)
    out = tmp_path / "run"
    final = train_grpo(tiny_vlm_dir, grpo_records, TextHashReward(), tiny_settings(out))

    assert final == out / "final"
    before, after = load_file(tiny_vlm_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed, "3 GRPO steps with non-zero advantages left every parameter unchanged"
    assert digest(tiny_vlm_dir) == base_files, "the reference checkpoint must never be written"

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    kl = [entry["kl"] for entry in history if "kl" in entry]
    assert len(kl) == 3
    # Step 1 samples from the initial policy, which IS the reference; later steps have moved away from it.
    assert kl[0] == pytest.approx(0.0, abs=1e-6)
    assert max(kl[1:]) > 0
    assert all("rewards/text_hash_reward/mean" in entry for entry in history if "kl" in entry)

    # The saved policy is an ordinary checkpoint: it loads through the same path as any other.
    from coordinator.answer_eval import generate_answers
    from mor_secure.models.tiny_vlm import load_vlm

    assert len(generate_answers(*load_vlm(final), grpo_records[:3])) == 3
    run = json.loads((out / RUN_RECORD).read_text())
    assert run["resumed_from"] is None and run["global_step"] == 3 and run["reward"] == "text_hash_reward"


def test_resume_continues_from_latest_checkpoint(tiny_vlm_dir: Path, grpo_records, tmp_path: Path, caplog):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no checkpoint-N to resume from"):
        train_grpo(tiny_vlm_dir, grpo_records, TextHashReward(), tiny_settings(out, steps=2), resume=True)

    train_grpo(tiny_vlm_dir, grpo_records, TextHashReward(), tiny_settings(out, steps=2, save_steps=2))
    assert latest_checkpoint(out) == out / "checkpoint-2"
    first_half = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]

    with pytest.raises(FileExistsError, match="resume=True"):
        train_grpo(tiny_vlm_dir, grpo_records, TextHashReward(), tiny_settings(out, steps=4, save_steps=2))

    with caplog.at_level(logging.INFO, logger="coordinator.grpo"):
        train_grpo(tiny_vlm_dir, grpo_records, TextHashReward(), tiny_settings(out, steps=4, save_steps=2),
                   resume=True)
    assert f"resuming GRPO from {out / 'checkpoint-2'}" in caplog.text
    assert json.loads((out / RUN_RECORD).read_text())["resumed_from"] == "checkpoint-2"

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    steps = [entry["step"] for entry in state["log_history"] if "kl" in entry]
    assert steps == [1, 2, 3, 4]
    # Steps 1-2 are the checkpoint's own log entries (wall-clock step_time included), not a re-run.
    assert [e for e in state["log_history"] if e["step"] <= 2 and "kl" in e] == [e for e in first_half if "kl" in e]
    assert (out / "checkpoint-4").is_dir()

    # Interrupted after the last step's checkpoint, before the caller used the policy: resuming trains no step
    # and keeps the checkpoint's weights (transformers alone would train a step 5).
    (out / RUN_RECORD).unlink()
    final = train_grpo(tiny_vlm_dir, grpo_records, TextHashReward(), tiny_settings(out, steps=4, save_steps=2),
                       resume=True)
    assert json.loads((out / RUN_RECORD).read_text())["resumed_from"] == "checkpoint-4"
    assert json.loads((out / RUN_RECORD).read_text())["global_step"] == 4
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e for e in history if "kl" in e] == [e for e in state["log_history"] if "kl" in e]
    saved, checkpointed = load_file(final / "model.safetensors"), load_file(out / "checkpoint-4" / "model.safetensors")
    assert saved.keys() == checkpointed.keys() and all(torch.equal(saved[k], checkpointed[k]) for k in saved)
    with pytest.raises(ValueError, match="at step 4, past steps=3"):
        train_grpo(tiny_vlm_dir, grpo_records, TextHashReward(), tiny_settings(out, steps=3), resume=True)


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(tiny_vlm_dir: Path, tmp_path: Path):
    """`accelerate launch --multi_gpu --num_processes 2` runs the same train_grpo call in two processes.

    On a machine without GPUs each process trains on the CPU (gloo backend).
    NOT `--cpu`: accelerate 1.15 then uses its simple launcher, which starts
    ONE process whatever --num_processes says (unless given an MPI hostfile).
    """
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "tests" / "integration" / "accelerate_grpo_run.py"),
               "--policy", str(tiny_vlm_dir), "--out", str(out), "--steps", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    run = json.loads((out / RUN_RECORD).read_text())
    assert run["processes"] == 2 and run["global_step"] == 2
    assert (out / "final" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- dataset


def test_grpo_dataset_has_the_columns_rewards_read(grpo_records):
    dataset = grpo_dataset(grpo_records[:3])
    assert set(dataset.column_names) == {"prompt", "image", "image_path", "question", "answer", "kind"}
    row, record = dataset[0], grpo_records[0]
    assert row["image"].mode == "RGB" and row["image"].size == (64, 64)
    assert row["image_path"] == str(record.image_path) and row["answer"] == record.answer
    assert row["prompt"][0]["role"] == "user"
    assert [part["type"] for part in row["prompt"][0]["content"]] == ["image", "text"]
    assert row["prompt"][0]["content"][1]["text"] == record.question
    with pytest.raises(ValueError, match="at least one record"):
        grpo_dataset([])


# --------------------------------------------------------------------------- rewards


class CountingSilo:
    """A fake SiloClient whose score is a fixed function of (image, prompt, response); records every call.

    It speaks the wire types (images as bytes with their digest); calls are
    recorded with the coordinator's file paths again, so tests compare rows.
    """

    def __init__(self, name: str, salt: int) -> None:
        self._name, self.salt, self.calls = name, salt, []

    @property
    def name(self) -> str:
        return self._name

    def describe(self) -> SiloDescription:
        return SiloDescription(name=self._name, architecture="counting", trainable_params=0)

    def correctness_bits(self, request):
        raise AssertionError("rewards never ask for correctness bits")

    def value(self, image: str, prompt: str, response: str) -> float:
        return (zlib.crc32(f"{self.salt}|{image}|{prompt}|{response}".encode()) % 1000) / 250 - 2

    def rows(self, request: ScoreRequest) -> tuple[list[str], list[str], list[str]]:
        path_of = {image_blob(path).sha256: path for path in set(IMAGES)}
        return ([path_of[request.images[r.image].sha256] for r in request.rows],
                [r.prompt for r in request.rows], [r.response for r in request.rows])

    def score(self, request: ScoreRequest) -> ScoreReply:
        images, prompts, responses = self.rows(request)
        self.calls.append((images, prompts, responses))
        values = [self.value(*row) for row in zip(images, prompts, responses, strict=True)]
        weights = request.weights or (1.0,) * len(values)  # the wire contract: pre-weighted when weights are sent
        return ScoreReply(scores=tuple(w * v for w, v in zip(weights, values, strict=True)))


class CountingFeatures:
    """A fake RouterFeatures: a fixed [N, 6] vector per (image, prompt); records every call."""

    dim = 6

    def __init__(self) -> None:
        self.calls = []

    def vector(self, image: str, prompt: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{image}|{prompt}".encode()))
        return torch.randn(self.dim, generator=generator)

    def encode(self, images, prompts) -> torch.Tensor:
        self.calls.append((list(images), list(prompts)))
        return torch.stack([self.vector(str(i), p) for i, p in zip(images, prompts, strict=True)])


SILOS = ("hospital-a", "bank-b", "hospital-c")
# Two prompts x three generations, as TRL passes them (each prompt's columns repeated per completion).
# Two real public images (the coordinator sends image bytes, so the files must exist).
IMAGE_A, IMAGE_B = (str(easy_vqa.get_train_image_paths()[i]) for i in (0, 1))
IMAGES = [IMAGE_A] * 3 + [IMAGE_B] * 3
QUESTIONS = ["What color is the shape?"] * 3 + ["Is there a circle?"] * 3
ANSWERS = ["blue"] * 3 + ["no"] * 3
RESPONSES = ["blue", "red", " teal ", "yes", "no", "no"]


def conversational(texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


def prompts_for(questions):
    return [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]


@pytest.fixture
def router() -> Router:
    torch.manual_seed(0)
    return Router(CountingFeatures.dim, len(SILOS), 2, RouterConfig(), silo_names=SILOS,
                  objective_names=("accuracy", "safety"))


def test_fused_reward_calls_each_silo_once_and_returns_the_weighted_sum(router: Router):
    silos = {name: CountingSilo(name, salt) for salt, name in enumerate(SILOS)}
    features = CountingFeatures()
    # Clients in another order than the router's: they are matched by name.
    reward = FusedSiloReward(list(reversed(silos.values())), router, features, objective="safety")
    log = {}
    out = reward(prompts_for(QUESTIONS), conversational(RESPONSES), image_path=IMAGES, question=QUESTIONS,
                 answer=ANSWERS, log_metric=log.__setitem__)

    stripped = [r.strip() for r in RESPONSES]
    for silo in silos.values():
        # One batched call per silo with every DISTINCT completion: the repeated ("b.png", "no") is sent once.
        assert silo.calls == [(IMAGES[:5], QUESTIONS[:5], stripped[:5])]
    assert out[4] == out[5]
    assert features.calls == [([IMAGE_A, IMAGE_B], ["What color is the shape?", "Is there a circle?"])]

    with torch.no_grad():
        expected = []
        for image, question, response in zip(IMAGES, QUESTIONS, stripped, strict=True):
            weights = router.weights(features.vector(image, question)[None], torch.tensor([1]))[0]
            expected.append(sum(weights[k].item() * silos[name].value(image, question, response)
                                for k, name in enumerate(SILOS)))
    assert out == pytest.approx(expected, abs=1e-5)
    assert reward.__name__ == "fused_silo_reward"
    assert set(log) == {f"{metric}/{name}" for name in SILOS for metric in ("router_weight", "silo_answered")}
    assert all(log[f"silo_answered/{name}"] == 1.0 for name in SILOS)


def test_fused_reward_handles_plain_and_empty_completions(router: Router):
    silos = [CountingSilo(name, salt) for salt, name in enumerate(SILOS)]
    reward = FusedSiloReward(silos, router, CountingFeatures(), objective="accuracy")
    responses = ["blue", "", "teal", "yes", "   ", "no"]
    out = reward(QUESTIONS, responses, image_path=IMAGES, question=QUESTIONS)
    assert out[1] == out[4] == EMPTY_COMPLETION_REWARD
    for silo in silos:  # silos refuse empty responses: only answered rows are sent, still in one call
        assert len(silo.calls) == 1 and silo.calls[0][2] == ["blue", "teal", "yes", "no"]


def test_fused_reward_rejects_mismatched_inputs(router: Router):
    silos = [CountingSilo(name, salt) for salt, name in enumerate(SILOS)]
    with pytest.raises(ValueError, match=r"missing clients: \['hospital-c'\]"):
        FusedSiloReward(silos[:2], router, CountingFeatures(), objective="accuracy")
    with pytest.raises(ValueError, match="unknown objective 'speed'"):
        FusedSiloReward(silos, router, CountingFeatures(), objective="speed")
    reward = FusedSiloReward(silos, router, CountingFeatures(), objective="accuracy")
    with pytest.raises(ValueError, match="needs the dataset column 'image_path'"):
        reward(QUESTIONS, RESPONSES, question=QUESTIONS)
    with pytest.raises(ValueError, match="column 'question' has 5 values for 6 completions"):
        reward(QUESTIONS, RESPONSES, image_path=IMAGES, question=QUESTIONS[:5])

    class WrongShape(CountingSilo):
        def score(self, request):
            return ScoreReply(scores=(0.0,) * (len(request.rows) + 1))

    bad = FusedSiloReward([*silos[:2], WrongShape("hospital-c", 9)], router, CountingFeatures(), objective="accuracy")
    with pytest.raises(SiloError, match="silo 'hospital-c' returned 6 scores for 5 rows"):
        bad(QUESTIONS, RESPONSES, image_path=IMAGES, question=QUESTIONS)


def test_uniform_and_single_silo_baselines():
    silos = [CountingSilo(name, salt) for salt, name in enumerate(SILOS)]
    columns = dict(image_path=IMAGES, question=QUESTIONS)
    uniform = UniformSiloReward(silos)(QUESTIONS, conversational(RESPONSES), **columns)
    single = SingleSiloReward(silos[1])(QUESTIONS, conversational(RESPONSES), **columns)
    stripped = [r.strip() for r in RESPONSES]
    rows = list(zip(IMAGES, QUESTIONS, stripped, strict=True))
    assert uniform == pytest.approx([sum(s.value(*row) for s in silos) / 3 for row in rows], abs=1e-5)
    assert single == pytest.approx([silos[1].value(*row) for row in rows], abs=1e-5)
    assert [len(s.calls) for s in silos] == [1, 2, 1]
    assert SingleSiloReward(silos[0]).__name__ == "single_silo_reward/hospital-a"


def test_exact_match_and_constant_rewards():
    completions = conversational(["Blue.", "red", "", "No, it is not"])
    answers = ["blue", "blue", "blue", "no"]
    assert ExactMatchReward()(prompts_for(["q"] * 4), completions, answer=answers) == [1.0, 0.0, 0.0, 1.0]
    assert ExactMatchReward()(["q"] * 2, ["yes", "circle"], answer=["yes", "triangle"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="needs the dataset column 'answer'"):
        ExactMatchReward()(["q"], ["yes"])
    assert ConstantReward(0.5)(["q"] * 3, ["a", "b", "c"]) == [0.5, 0.5, 0.5]


# --------------------------------------------------------------------------- settings


def test_settings_refuse_what_trl_would_misuse(tmp_path: Path):
    with pytest.raises(ValidationError, match=r"KL penalty to the frozen reference.*set beta > 0"):
        GRPOSettings(output_dir=tmp_path, beta=0)
    with pytest.raises(ValidationError, match="set beta > 0"):
        GRPOSettings(output_dir=tmp_path, beta=-0.1)
    with pytest.raises(ValidationError, match=r"unknown key\(s\) \['scale_reward'\]: each key must be a "
                                              r"trl.GRPOConfig field.*did you mean \['scale_rewards'"):
        GRPOSettings(output_dir=tmp_path, trl_overrides={"scale_reward": "batch"})
    with pytest.raises(ValidationError, match=r"\['beta', 'max_steps'\], which GRPOSettings owns.*GRPOSettings.steps"):
        GRPOSettings(output_dir=tmp_path, trl_overrides={"max_steps": 5, "beta": 0.1})
    with pytest.raises(ValidationError, match="not a multiple of num_generations \\(8\\).*multiple of 8 \\(e.g. 8\\)"):
        GRPOSettings(output_dir=tmp_path, per_device_train_batch_size=6)
    with pytest.raises(ValidationError, match="num_generations"):
        GRPOSettings(output_dir=tmp_path, num_generations=1)


def test_several_processes_must_each_score_whole_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """6 x 2 processes = 12 is a multiple of 4, but TRL deals 6 at a time per process: one group would be split."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValidationError, match=r"with 2 processes, per_device_train_batch_size \(6\) must be a "
                                              r"multiple of num_generations \(4\).*\(e.g. 8\)"):
        GRPOSettings(output_dir=tmp_path, per_device_train_batch_size=6, num_generations=4)
    # (A 2-process run that passes is test_two_processes_under_accelerate_launch: GRPOConfig needs its launcher.)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert GRPOSettings(output_dir=tmp_path, per_device_train_batch_size=6, num_generations=4,
                        trl_overrides={"gradient_accumulation_steps": 2})  # one process sees every group whole
    with pytest.raises(ValidationError, match="trl.GRPOConfig rejects these settings"):
        GRPOSettings(output_dir=tmp_path, trl_overrides={"lr_scheduler_type": "no-such-schedule"})

    overrides = {"gradient_accumulation_steps": 2, "scale_rewards": "batch"}
    config = GRPOSettings(output_dir=tmp_path, trl_overrides=overrides).to_grpo_config()
    assert (config.max_steps, config.beta, config.num_generations) == (300, 0.2, 8)
    assert config.gradient_accumulation_steps == 2 and config.scale_rewards == "batch"
    assert config.report_to in ([], "none", ["none"]) and config.bf16 is False
    # The deprecated alias still reaches TRL (our activation_checkpointing default must not shadow it).
    alias = GRPOSettings(output_dir=tmp_path, trl_overrides={"gradient_checkpointing": True})
    assert alias.to_grpo_config().gradient_checkpointing is True
