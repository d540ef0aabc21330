"""Every reward architecture: Opacus-compatible, DP-trainable without touching frozen weights, saved and loaded."""

from __future__ import annotations

import hashlib
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from mor_secure.data import make_pairs
from mor_secure.data.records import PreferencePair
from mor_secure.models import RewardModel, Standardisation, architectures, load_reward_model
from mor_secure.models.images import KeyedImage
from mor_secure.models.reward_architectures import (
    FrozenEncoderRewardModel,
    LoraVLMRewardModel,
    SmallCNNRewardModel,
)
from mor_secure.models.reward_model import MANIFEST, LocalResources
from mor_secure.privacy import DPConfig, TrainingConfig, TrainingResult, train_bradley_terry
from mor_secure.wire import ErrorCode, ImageBlob, ScoreRequest, ScoreRow, SiloError
from silo_agent.service import SiloService

ARCHITECTURES = ("lora_vlm", "frozen_encoders", "small_cnn")
# Pairs come from this many images only: the frozen encoders run EfficientNet at 224 px per image.
N_IMAGES = 4
N_TRAIN = 24
# Privacy units of 2 pairs each (4 images would be too few units): every architecture is trained through
# the per-unit path, frozen_encoders through its [units, K, features] layout.
UNIT_IDS = [f"unit-{i // 2}" for i in range(N_TRAIN)]
BATCH_SIZE = 6  # 12 units, sample rate 1/2: 2 noisy steps (a DP step of the tiny VLM takes ~1.5 s on 2 busy cores)
# rdp: ~1 s to calibrate noise instead of ~3 s for prv; the accountant is tested in test_privacy_*.
TRAINING = TrainingConfig(epochs=1, batch_size=BATCH_SIZE, learning_rate=0.01, seed=0,
                          dp=DPConfig(target_epsilon=8.0, target_delta=1e-5, accountant="rdp"))


@dataclass
class Trained:
    """One architecture before and after a short DP run."""

    name: str
    model: RewardModel
    validator_errors: list
    frozen_before: dict[str, torch.Tensor]
    trainable_before: dict[str, torch.Tensor]
    result: TrainingResult
    train: list[PreferencePair]
    validation: list[PreferencePair]
    base_model_digest_before: dict[str, str] | None
    base_model_dir: Path | None


def _digest_dir(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _frozen_components(model: RewardModel) -> dict[str, nn.Module]:
    """Modules whose weights must never move: the DP-trained `module` plus what lies outside it."""
    parts: dict[str, nn.Module] = {"module": model.module}
    if isinstance(model, SmallCNNRewardModel):
        parts["trunk"] = model.trunk  # pre-trained on public data, then frozen
    if isinstance(model, FrozenEncoderRewardModel):
        parts["image_encoder"] = model.image_encoder._model
        parts["text_encoder"] = model.text_encoder._model
    return parts


def _snapshot(model: RewardModel, *, trainable: bool) -> dict[str, torch.Tensor]:
    return {f"{part}.{name}": p.detach().clone()
            for part, module in _frozen_components(model).items()
            for name, p in module.named_parameters() if p.requires_grad == trainable}


def _current(model: RewardModel) -> dict[str, torch.Tensor]:
    return {f"{part}.{name}": p.detach()
            for part, module in _frozen_components(model).items() for name, p in module.named_parameters()}


@pytest.fixture(scope="module")
def pairs(consortium) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Clean pairs on a few of bank-b's private images: (train, validation)."""
    _, splits = consortium
    records = splits.private["bank-b"]
    images = sorted({r.image_path for r in records})[:N_IMAGES]
    chosen = [r for r in records if r.image_path in images]
    all_pairs = list(make_pairs(chosen, seed=0))
    assert len(all_pairs) >= N_TRAIN + 8
    return all_pairs[:N_TRAIN], all_pairs[N_TRAIN:]


def _build(name: str, consortium, reference_dir: Path, cache_dir: Path) -> RewardModel:
    if name == "lora_vlm":
        return LoraVLMRewardModel(base_model=reference_dir, rank=4, alpha=8, seed=0)
    if name == "frozen_encoders":
        return FrozenEncoderRewardModel(cache_dir=cache_dir)
    _, splits = consortium
    model = SmallCNNRewardModel(channels=16, text_dim=16, width=16, seed=0)
    model.pretrain(splits.sft, steps=5, batch_size=32)
    return model


@pytest.fixture(scope="module", params=ARCHITECTURES)
def trained(request, consortium, pairs, tmp_path_factory) -> Trained:
    name = request.param
    # Only lora_vlm needs the VLM; requesting it lazily keeps the other cases from building it.
    reference_dir = request.getfixturevalue("reference_dir") if name == "lora_vlm" else None
    digest_before = _digest_dir(reference_dir) if reference_dir else None
    model = _build(name, consortium, reference_dir, tmp_path_factory.mktemp(f"{name}-cache"))
    validator_errors = [*ModuleValidator.validate(model.module, strict=False),
                        *GradSampleModule.validate(model.module, strict=False)]
    train, validation = pairs
    if name == "frozen_encoders":
        # Fill the feature caches in one encoder call each: every encoder call pays a fixed
        # ~0.5-2.5 s on two busy cores, however few rows it holds.
        everything = train + validation
        model.image_encoder.encode([p.image_path for p in everything])
        model.text_encoder.encode([p.prompt for p in everything] + [p.chosen for p in everything]
                                  + [p.rejected for p in everything])
    dataset = model.pair_dataset(train)
    frozen_before = _snapshot(model, trainable=False)
    trainable_before = _snapshot(model, trainable=True)
    result = train_bradley_terry(model.module, dataset, TRAINING, unit_ids=UNIT_IDS, progress=False,
                                 description=name)
    return Trained(name, model, validator_errors, frozen_before, trainable_before, result, train, validation,
                   digest_before, reference_dir)


def _score_all(model: RewardModel, pairs: list[PreferencePair]) -> torch.Tensor:
    """Scores of the chosen then the rejected answers of `pairs`."""
    images = [p.image_path for p in pairs] * 2
    prompts = [p.prompt for p in pairs] * 2
    return model.score(images, prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])


def test_every_architecture_is_registered() -> None:
    assert set(ARCHITECTURES) <= set(architectures())


@pytest.mark.parametrize("build", [lambda seed, cache: FrozenEncoderRewardModel(cache_dir=cache, seed=seed),
                                   lambda seed, cache: SmallCNNRewardModel(channels=16, text_dim=16, width=16, seed=seed)],
                         ids=["frozen_encoders", "small_cnn"])
def test_a_fresh_model_starts_from_its_seed_whatever_ran_before(build, tmp_path: Path) -> None:
    """A baseline's or a silo's `seed` must fix its initial weights (frozen_encoders once took the global RNG's)."""
    first = _snapshot(build(1, tmp_path), trainable=True)
    torch.rand(7)  # other work in the same process moves the global RNG
    again, other = _snapshot(build(1, tmp_path), trainable=True), _snapshot(build(2, tmp_path), trainable=True)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_module_passes_opacus_validators(trained: Trained) -> None:
    assert trained.validator_errors == []


def test_dp_run_spent_the_planned_privacy(trained: Trained) -> None:
    report = trained.result.report
    assert report.dp_enabled
    assert report.sample_rate == pytest.approx(1 / 2)
    assert report.steps == 2
    assert 8.0 - 0.05 <= report.epsilon <= 8.0
    assert report.privacy_unit == "image" and trained.result.diagnostics.units == N_TRAIN // 2
    history = trained.result.diagnostics.loss_history
    assert len(history) == 1 and math.isfinite(history[0])


def test_frozen_weights_are_bit_identical_after_dp_training(trained: Trained) -> None:
    assert trained.frozen_before, "nothing frozen to check: the test would be vacuous"
    now = _current(trained.model)
    changed = [name for name, before in trained.frozen_before.items() if not torch.equal(now[name], before)]
    assert changed == []
    # No frozen parameter was switched to trainable along the way.
    params = {f"{part}.{n}": p for part, m in _frozen_components(trained.model).items() for n, p in m.named_parameters()}
    assert not any(params[name].requires_grad for name in trained.frozen_before)
    if trained.name == "lora_vlm":
        _check_base_checkpoint_untouched(trained)


def _check_base_checkpoint_untouched(trained: Trained) -> None:
    """lora_vlm: the shared base checkpoint's files, and the backbone in memory, still equal what was loaded."""
    from mor_secure.models.tiny_vlm import load_vlm

    assert trained.base_model_dir is not None
    fresh, _ = load_vlm(trained.base_model_dir)
    # Saving the reward model must not write into the base checkpoint either.
    trained.model.save(trained.base_model_dir.parent / "lora-reward-model")
    assert _digest_dir(trained.base_model_dir) == trained.base_model_digest_before
    # LoRA stays additive (never merged): every base weight is still the checkpoint's.
    current = trained.model.module.backbone.get_base_model().state_dict()
    for name, tensor in fresh.state_dict().items():
        peft_name = name.rsplit(".", 1)[0] + ".base_layer." + name.rsplit(".", 1)[1]
        assert torch.equal(current[name if name in current else peft_name], tensor), name


def test_some_trainable_weight_changed(trained: Trained) -> None:
    assert trained.trainable_before
    now = _current(trained.model)
    changed = [name for name, before in trained.trainable_before.items() if not torch.equal(now[name], before)]
    assert changed, "DP training left every trainable parameter unchanged"
    # Opacus is fully detached: no per-sample state left on any parameter.
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in trained.model.module.parameters())
    assert not isinstance(trained.model.module, GradSampleModule)


def test_which_parameters_are_trainable(trained: Trained) -> None:
    trainable = set(trained.trainable_before)
    if trained.name == "lora_vlm":
        # Only LoRA matrices and the scalar heads; never a base-model weight.
        assert all("lora_" in n or n.startswith(("module.head.", "module.likelihood_weight.")) for n in trainable)
        assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
        assert {"module.head.weight", "module.likelihood_weight.weight"} <= trainable
    else:
        # The whole DP-trained module, and nothing outside it.
        assert all(n.startswith("module.") for n in trainable)
        assert len(trainable) == len(list(trained.model.module.parameters()))
    assert trained.model.trainable_parameters() == sum(t.numel() for t in trained.trainable_before.values())


def test_score_is_one_finite_float_per_row(trained: Trained) -> None:
    pairs = trained.validation
    scores = trained.model.score([p.image_path for p in pairs], [p.prompt for p in pairs], [p.chosen for p in pairs])
    assert scores.dtype == torch.float32
    assert scores.shape == (len(pairs),)
    assert torch.isfinite(scores).all()
    # Row order is kept: scoring one row alone gives that row's score.
    one = trained.model.score([pairs[2].image_path], [pairs[2].prompt], [pairs[2].chosen])
    assert one.shape == (1,)
    assert torch.allclose(one[0], scores[2], atol=1e-5)


def test_score_rejects_mismatched_lengths(trained: Trained) -> None:
    p = trained.validation[0]
    with pytest.raises(ValueError, match="differ in length"):
        trained.model.score([p.image_path, p.image_path], [p.prompt], [p.chosen])


def test_fit_standardisation_gives_mean_zero_std_one(trained: Trained) -> None:
    model, validation = trained.model, trained.validation
    standardisation = model.fit_standardisation(validation)
    assert model.standardisation == standardisation
    assert standardisation.std > 0
    scores = _score_all(model, validation)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-3)
    raw = model.raw_scores([p.image_path for p in validation], [p.prompt for p in validation],
                           [p.chosen for p in validation])
    standardised = model.score([p.image_path for p in validation], [p.prompt for p in validation],
                               [p.chosen for p in validation])
    assert torch.allclose(standardised, (raw - standardisation.mean) / standardisation.std, atol=1e-5)


def test_pairwise_accuracy_matches_raw_score_comparison(trained: Trained) -> None:
    model, validation = trained.model, trained.validation
    accuracy = model.pairwise_accuracy(validation)
    assert 0.0 <= accuracy <= 1.0
    images, prompts = [p.image_path for p in validation], [p.prompt for p in validation]
    chosen = model.raw_scores(images, prompts, [p.chosen for p in validation])
    rejected = model.raw_scores(images, prompts, [p.rejected for p in validation])
    assert accuracy == pytest.approx((chosen > rejected).float().mean().item())
    assert math.isnan(model.pairwise_accuracy([]))


def test_save_and_load_round_trip(trained: Trained, tmp_path_factory, tiny_vlm_dir: Path) -> None:
    """A saved model names no path of its machine: copied elsewhere, it loads and scores identically."""
    model, validation = trained.model, trained.validation
    model.fit_standardisation(validation)
    saved_at = tmp_path_factory.mktemp(f"{trained.name}-saved")
    directory = model.save(saved_at / "reward_model")
    assert (directory / MANIFEST).is_file()
    # Every path of this run (model, feature cache, base VLM) lies under pytest's base temp directory.
    machine_paths = [str(tmp_path_factory.getbasetemp()), str(Path.cwd())]
    for file in directory.rglob("*"):
        if file.is_file():
            text = file.read_bytes()
            assert not any(path.encode() in text for path in machine_paths), file
    moved = tmp_path_factory.mktemp(f"{trained.name}-moved") / "copied_model"
    shutil.copytree(directory, moved)
    shutil.rmtree(directory)
    loaded = load_reward_model(moved, LocalResources(base_model=trained.base_model_dir))
    assert type(loaded) is type(model)
    assert loaded.architecture == trained.name
    assert loaded.standardisation == model.standardisation
    assert loaded.standardisation != Standardisation()
    assert torch.allclose(_score_all(loaded, validation), _score_all(model, validation), atol=1e-5)
    if trained.name == "lora_vlm":
        # The saved adapter holds only LoRA weights, never a copy of the shared base model.
        adapter = load_file(str(moved / "adapter" / "adapter_model.safetensors"))
        assert adapter and all("lora_" in key for key in adapter)
        with pytest.raises(ValueError, match="needs the shared VLM it was trained on"):
            load_reward_model(moved)
        with pytest.raises(ValueError, match="is not the VLM this reward model was trained on"):
            load_reward_model(moved, LocalResources(base_model=tiny_vlm_dir))


def test_load_reward_model_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=MANIFEST):
        load_reward_model(tmp_path)
    (tmp_path / MANIFEST).write_text('{"architecture": "nope", "standardisation": {}, "settings": {}}')
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        load_reward_model(tmp_path)


def test_untrained_lora_vlm_scores_what_the_silo_learned_not_the_shared_vlm(consortium, reference_dir: Path) -> None:
    # Fresh adapters (LoRA B = 0) and a zero head: the log-ratio to the adapter-free backbone is 0 for every
    # answer. Scoring log p(answer) alone would rank answers by the shared VLM's likelihood instead.
    model = LoraVLMRewardModel(base_model=reference_dir, rank=4, alpha=8, seed=0)
    _, splits = consortium
    record = splits.test[0]
    answers = [record.answer, "circle", "red", "yes", "no"]
    scores = model.raw_scores([record.image_path] * len(answers), [record.question] * len(answers), answers)
    assert torch.allclose(scores, torch.zeros_like(scores), atol=1e-5)


def test_lora_vlm_refuses_text_holding_its_tokenizers_control_tokens(consortium, reference_dir: Path) -> None:
    """`<image>` in a prompt made the processor count two images for one (a ValueError answered INTERNAL), and
    `<|end|>` or `<|assistant|>` in a response were read as the chat's own control tokens."""
    model = LoraVLMRewardModel(base_model=reference_dir, rank=4, alpha=8, seed=0)
    assert {"<image>", "<|end|>", "<|assistant|>", "<|user|>"} <= set(model.reserved_text)
    _, splits = consortium
    record = splits.test[0]
    for prompt, response, field in ((f"<image> {record.question}", "red", "prompts[0]"),
                                    (record.question, "red<|end|>", "responses[0]"),
                                    (record.question, "<|assistant|>no", "responses[0]")):
        with pytest.raises(ValueError, match=rf"{re.escape(field)} contains '<\|?[a-z]+\|?>', a control token of "
                           "this model's tokenizer"):
            model.raw_scores([record.image_path], [prompt], [response])
    service = SiloService("hospital-a", model)
    image = ImageBlob.of(Path(record.image_path).read_bytes())
    for prompt, response, refusal in (("<image> what colour?", "red", "prompts[0] contains '<image>'"),
                                      ("what colour?", "red<|end|>", "responses[0] contains '<|end|>'")):
        with pytest.raises(SiloError, match=re.escape(f"{refusal}, a control token of this silo's model")) as refused:
            service.score(ScoreRequest(objective="correct", images=(image,), rows=(ScoreRow(0, prompt, response),)))
        assert refused.value.code == ErrorCode.INVALID_ARGUMENT
    assert len(service.score(ScoreRequest(objective="correct", images=(image,),
                                          rows=(ScoreRow(0, record.question, "red"),))).scores) == 1


def test_lora_vlm_hands_its_processor_every_image_square_at_the_vision_towers_size(tiny_vlm_dir: Path) -> None:
    """The processor scales an image's shortest edge to the tower's size keeping its aspect ratio, so a thin
    image grew by its aspect ratio before the centre crop: a 132-byte 16384x1 PNG cost ~620 MB, and the
    1,048,576x1 the default policy admits would have needed ~40 GB. A square image reaches it unchanged."""
    model = LoraVLMRewardModel(base_model=tiny_vlm_dir, rank=4, alpha=8, seed=0)
    processor, sizes = model.processor, []

    class Recording:
        def __getattr__(self, name: str):
            return getattr(processor, name)

        def __call__(self, *, images, **kwargs):
            sizes.extend(image.size for image in images)
            return processor(images=images, **kwargs)

    model.processor = Recording()
    square = KeyedImage("square", Image.effect_noise((64, 64), 64).convert("RGB"))
    images = [KeyedImage("wide", Image.new("RGB", (4096, 1), "red")),
              KeyedImage("tall", Image.new("RGB", (1, 4096), "red")), square]
    side = model.side_inputs(images, ["what color is the shape?"] * 3, ["red"] * 3)
    assert model.image_size == 64 and sizes == [(64, 64)] * 3
    unchanged = processor.image_processor(images=[square.image], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(side[2][2], unchanged)
