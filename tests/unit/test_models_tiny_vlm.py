"""The tiny LLaVA: built from config, saved, loaded back with the Auto classes, generating and training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from coordinator.answer_eval import MAX_ANSWER_TOKENS, generate_answers
from coordinator.vlm_batches import generation_batch, prompt_texts, supervised_batch
from mor_secure.models.tiny_vlm import (
    END_TOKEN,
    IMAGE_TOKEN,
    build_tiny_vlm,
    load_vlm,
    user_prompt,
)

# 64x64 images in 16x16 patches, CLS dropped ("default" feature strategy): 16 image tokens.
EXPECTED_IMAGE_TOKENS = (64 // 16) ** 2


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir: Path):
    return load_vlm(tiny_vlm_dir)


def test_checkpoint_is_a_standard_hf_checkpoint(tiny_vlm_dir: Path, tiny_vlm_config) -> None:
    names = {p.name for p in tiny_vlm_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    # The plain Auto classes (no project code) resolve the checkpoint to LLaVA with our sizes.
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir)
    processor = AutoProcessor.from_pretrained(tiny_vlm_dir)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert type(processor).__name__ == "LlavaProcessor"
    assert model.config.vision_config.hidden_size == tiny_vlm_config.vision_hidden == 32
    assert model.config.text_config.hidden_size == tiny_vlm_config.text_hidden == 32
    assert model.config.text_config.num_hidden_layers == 1
    assert model.config.vision_config.num_hidden_layers == 1
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert processor.tokenizer.padding_side == "left"
    assert processor.tokenizer.eos_token == END_TOKEN


def _loaded_name(saved_name: str) -> str:
    """Checkpoint key -> module key (LLaVA checkpoints keep the legacy layout on disk)."""
    for old, new in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if saved_name.startswith(old):
            return new + saved_name[len(old):]
    return saved_name


def test_load_vlm_gives_the_saved_weights(tiny_vlm_dir: Path, vlm) -> None:
    model, _ = vlm
    saved = load_file(str(tiny_vlm_dir / "model.safetensors"))
    state = model.state_dict()
    assert len(saved) >= 30
    for key, tensor in saved.items():
        assert torch.equal(state[_loaded_name(key)], tensor), key
    # Tied embeddings: the LM head is the input embedding table, not a separate random matrix.
    assert torch.equal(state["lm_head.weight"], state["model.language_model.embed_tokens.weight"])


def test_build_is_deterministic(tmp_path: Path, consortium_path: Path, tiny_vlm_dir: Path, tiny_vlm_config) -> None:
    from coordinator.cli import vlm_corpus

    again = build_tiny_vlm(tmp_path / "again", vlm_corpus(consortium_path), tiny_vlm_config)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_vlm_dir / name).read_bytes(), name


def test_generate_on_a_real_image_returns_new_tokens(vlm, consortium) -> None:
    model, processor = vlm
    _, splits = consortium
    records = list(splits.test[:3])
    batch = generation_batch(processor, records)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    prompt_length = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False)
    assert out.shape[0] == 3
    assert prompt_length < out.shape[1] <= prompt_length + MAX_ANSWER_TOKENS
    # generate returns prompt + continuation; the prompt is echoed unchanged.
    assert torch.equal(out[:, :prompt_length], batch["input_ids"])
    answers = generate_answers(model, processor, records, batch_size=2)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_chat_template_renders_image_and_assistant_header(vlm) -> None:
    _, processor = vlm
    text = processor.apply_chat_template(user_prompt("what color is the shape?"), add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<|user|><image>what color is the shape?<|end|><|assistant|>"
    assert text.count(IMAGE_TOKEN) == 1
    without_header = processor.apply_chat_template(user_prompt("q?"), add_generation_prompt=False, tokenize=False)
    assert not without_header.endswith("<|assistant|>")
    assert prompt_texts(processor, ["q?"]) == [processor.apply_chat_template(
        user_prompt("q?"), add_generation_prompt=True, tokenize=False)]


def test_processor_expands_the_image_token_to_one_per_patch(vlm, consortium) -> None:
    _, processor = vlm
    _, splits = consortium
    batch = generation_batch(processor, splits.test[:2])
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    per_row = (batch["input_ids"] == image_token_id).sum(dim=1)
    assert per_row.tolist() == [EXPECTED_IMAGE_TOKENS, EXPECTED_IMAGE_TOKENS]
    # The prompt ends with the assistant header on every row (left padding).
    header = processor.tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert batch["input_ids"][:, -1].tolist() == [header, header]


def test_load_vlm_without_config_raises_naming_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not-a-checkpoint") as info:
        load_vlm(empty)
    assert str(empty) in str(info.value)
    assert "config.json" in str(info.value)


def test_supervised_batch_labels_only_answer_and_end_token(vlm, consortium) -> None:
    _, processor = vlm
    _, splits = consortium
    # Different question lengths and answers, so rows are padded differently.
    by_kind = {}
    for record in splits.sft:
        by_kind.setdefault(record.kind, record)
    records = [by_kind["color"], by_kind["shape"], by_kind["yes_no"]]
    assert len({len(r.question) for r in records}) > 1
    batch = supervised_batch(processor, records)
    labels, ids = batch["labels"], batch["input_ids"]
    assert labels.shape == ids.shape
    end_id = processor.tokenizer.convert_tokens_to_ids(END_TOKEN)
    for row, record in enumerate(records):
        n = len(processor.tokenizer(record.answer + END_TOKEN, add_special_tokens=False)["input_ids"])
        assert n >= 2
        # -100 everywhere except the last n positions (answer + end token), which copy the input ids.
        assert (labels[row, :-n] == -100).all()
        assert torch.equal(labels[row, -n:], ids[row, -n:])
        assert labels[row, -1].item() == end_id
        assert processor.tokenizer.decode(labels[row, -n:]) == record.answer + END_TOKEN
        # No label on padding or on the prompt (image tokens included).
        assert (labels[row][batch["attention_mask"][row] == 0] == -100).all()
    # At least one row is actually padded, so the left-padding path is exercised.
    assert (batch["attention_mask"] == 0).any()


def test_supervised_batch_trains(vlm, consortium) -> None:
    """One loss is finite and a gradient reaches both towers."""
    model, processor = vlm
    _, splits = consortium
    batch = supervised_batch(processor, splits.sft[:4])
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    named = dict(model.named_parameters())
    vision = [p for n, p in named.items() if "vision_tower" in n and p.grad is not None]
    text = [p for n, p in named.items() if "language_model" in n and p.grad is not None]
    assert vision and any(p.grad.abs().sum() > 0 for p in vision)
    assert text and any(p.grad.abs().sum() > 0 for p in text)
    model.zero_grad(set_to_none=True)
    model.eval()
