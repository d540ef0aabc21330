"""Exact-match answer accuracy of a VLM on held-out VQA records, per question kind."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, ProcessorMixin

from mor_secure.data.records import QUESTION_KINDS, VQARecord

from .vlm_batches import generation_batch

# easy-VQA answers are one word; 4 tokens cover every answer plus the end token.
MAX_ANSWER_TOKENS = 4


def normalise_answer(text: str) -> str:
    """First word, lower-cased, without surrounding punctuation: how answers are compared."""
    words = text.strip().lower().split()
    return words[0].strip(".,!?;:\"'") if words else ""


@torch.no_grad()
def generate_answers(model: PreTrainedModel, processor: ProcessorMixin, records: Sequence[VQARecord],
                     *, batch_size: int = 64) -> list[str]:
    """Greedy answers, normalised."""
    model.eval()
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        batch = generation_batch(processor, records[start:start + batch_size])
        out = model.generate(**batch, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False)
        completions = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.extend(normalise_answer(c) for c in completions)
    return answers


def accuracy_by_kind(records: Sequence[VQARecord], answers: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per kind plus "overall" (the mean over records, not over kinds)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for record, answer in zip(records, answers, strict=True):
        hits[record.kind].append(answer == record.answer)
    result = {kind: sum(h) / len(h) for kind in QUESTION_KINDS if (h := hits.get(kind))}
    result["overall"] = sum(sum(h) for h in hits.values()) / max(1, len(records))
    return result


def evaluate_answers(model: PreTrainedModel, processor: ProcessorMixin, records: Sequence[VQARecord],
                     *, batch_size: int = 64) -> dict[str, float]:
    """Generate then score: the held-out accuracy table of a policy."""
    return accuracy_by_kind(records, generate_answers(model, processor, records, batch_size=batch_size))
