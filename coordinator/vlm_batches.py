"""Turn VQA records into processor batches for the policy VLM (training and generation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import ProcessorMixin

from mor_secure.data.records import VQARecord
from mor_secure.models.images import load_rgb
from mor_secure.models.tiny_vlm import END_TOKEN, user_prompt


def prompt_texts(processor: ProcessorMixin, questions: Sequence[str]) -> list[str]:
    """Chat-formatted prompts ending with the assistant header."""
    return [processor.apply_chat_template(user_prompt(q), add_generation_prompt=True, tokenize=False) for q in questions]


def generation_batch(processor: ProcessorMixin, records: Sequence[VQARecord]) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for `generate`."""
    images = [load_rgb(str(r.image_path)) for r in records]
    return processor(images=images, text=prompt_texts(processor, [r.question for r in records]),
                     return_tensors="pt", padding=True)


def supervised_batch(processor: ProcessorMixin, records: Sequence[VQARecord]) -> dict[str, torch.Tensor]:
    """Prompt + answer + end token, with labels only on the answer and end token.

    Left padding (the tokenizer's default) is safe for training: Llama's rotary
    embeddings make attention depend on relative positions only.
    """
    prompts = prompt_texts(processor, [r.question for r in records])
    full = [p + r.answer + END_TOKEN for p, r in zip(prompts, records)]
    images = [load_rgb(str(r.image_path)) for r in records]
    batch = processor(images=images, text=full, return_tensors="pt", padding=True)
    answer_lengths = [len(processor.tokenizer(r.answer + END_TOKEN, add_special_tokens=False)["input_ids"]) for r in records]
    labels = torch.full_like(batch["input_ids"], -100)
    for row, n in enumerate(answer_lengths):
        labels[row, -n:] = batch["input_ids"][row, -n:]
    batch["labels"] = labels
    return batch
