"""Exact-match answer accuracy of a VLM on held-out VQA records, per question kind."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, ProcessorMixin, TrainerCallback

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
                     *, batch_size: int = 64, samples: int = 0, temperature: float = 1.0,
                     seed: int = 0) -> list[str]:
    """Normalised answers: greedy with `samples=0`; else `samples` sampled answers per record, record-major.

    Sampling is plain ancestral sampling at `temperature` (no top-k / top-p),
    as GRPO samples its completions, so the sampled accuracy is the expected
    reward of the policy GRPO optimises.
    """
    model.eval()
    options = ({"do_sample": False} if samples == 0 else
               {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0,
                "num_return_sequences": samples})
    answers: list[str] = []
    # manual_seed seeds every CUDA device too: fork them all, or GRPO's sampling continues from this seed.
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        for start in range(0, len(records), batch_size):
            batch = generation_batch(processor, records[start:start + batch_size])
            out = model.generate(**batch, max_new_tokens=MAX_ANSWER_TOKENS, **options)
            completions = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            answers.extend(normalise_answer(c) for c in completions)
    return answers


def accuracy_by_kind(records: Sequence[VQARecord], answers: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per kind plus "overall", the mean over kinds (each silo's domain weighs the same).

    `answers` may hold several answers per record, record-major (as
    `generate_answers(..., samples=n)` returns them).
    """
    if not records or len(answers) % len(records):
        raise ValueError(f"{len(answers)} answers for {len(records)} records: expected a whole number per record")
    per_record = len(answers) // len(records)
    hits: dict[str, list[bool]] = defaultdict(list)
    for index, answer in enumerate(answers):
        record = records[index // per_record]
        hits[record.kind].append(answer == record.answer)
    result = {kind: sum(h) / len(h) for kind in QUESTION_KINDS if (h := hits.get(kind))}
    result["overall"] = sum(result.values()) / len(result)
    return result


def evaluate_answers(model: PreTrainedModel, processor: ProcessorMixin, records: Sequence[VQARecord],
                     *, batch_size: int = 64, samples: int = 0, seed: int = 0) -> dict[str, float]:
    """Generate then score: the held-out accuracy table of a policy (greedy, or mean over `samples` draws)."""
    answers = generate_answers(model, processor, records, batch_size=batch_size, samples=samples, seed=seed)
    return accuracy_by_kind(records, answers)


def balanced_sample(records: Sequence[VQARecord], per_kind: int | None, *, seed: int) -> list[VQARecord]:
    """At most `per_kind` records of each kind (seeded), so that "overall" weighs every silo's domain equally.

    easy-VQA's test split is 74% yes/no: a micro-averaged overall would mostly
    measure one silo's kind. `per_kind=None` keeps every record. Each kind is
    drawn from its own seeded stream, so leaving a kind out (leave-one-silo-out)
    keeps exactly the records the other kinds had.
    """
    kept: list[VQARecord] = []
    for kind in QUESTION_KINDS:
        group = [r for r in records if r.kind == kind]
        if per_kind is not None and len(group) > per_kind:
            group = random.Random(f"{seed}/{kind}").sample(group, per_kind)
        kept.extend(group)
    if not kept:
        raise ValueError("no records to sample from")
    return kept


class AccuracyCallback(TrainerCallback):
    """Held-out accuracy every `every` optimizer steps (greedy, or over `samples` draws), appended to the log history.

    Entries look like {"step": 40, "eval_accuracy/overall": 0.61, "eval_accuracy/color": ...}
    and land in trainer_state.json, from which the accuracy-over-steps plots are drawn.
    """

    def __init__(self, processor: ProcessorMixin, records: Sequence[VQARecord], *, every: int,
                 samples: int = 0) -> None:
        if every <= 0:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        if not records:
            raise ValueError("AccuracyCallback needs at least one record")
        self.processor = processor
        self.records = list(records)
        self.every = every
        self.samples = samples

    def _log(self, state, model) -> None:
        was_training = model.training
        accuracy = evaluate_answers(model, self.processor, self.records, samples=self.samples)
        model.train(was_training)
        state.log_history.append({"step": state.global_step,
                                  **{f"eval_accuracy/{k}": round(v, 4) for k, v in accuracy.items()}})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and model is not None:
            self._log(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and (state.global_step % self.every == 0 or state.global_step == state.max_steps):
            self._log(state, model)
