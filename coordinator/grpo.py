"""GRPO alignment of the policy VLM with TRL's `GRPOTrainer` (DESIGN §2.3).

We wrap TRL, never fork it: group-normalised advantages, the clipped ratio,
the k3 KL to a frozen reference (kept because `beta > 0`), generation,
checkpointing, resuming and multi-process scale-out (`accelerate launch`) are
all TRL's and transformers' own. What this module owns is the handful of
settings that matter for this project, validated up front with messages that
say how to fix them, and the dataset layout the reward callables of
`coordinator.rewards` read (`image_path`, `question`, `answer`, `kind`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState

from mor_secure.config import StrictModel
from mor_secure.data.records import VQARecord
from mor_secure.models.tiny_vlm import load_vlm, user_prompt

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
RUN_RECORD = "grpo_run.json"

# GRPOSettings field -> the GRPOConfig field it sets. These may not appear in trl_overrides.
_OWNED = {
    "steps": "max_steps",
    "num_generations": "num_generations",
    "beta": "beta",
    "learning_rate": "learning_rate",
    "per_device_train_batch_size": "per_device_train_batch_size",
    "max_completion_length": "max_completion_length",
    "temperature": "temperature",
    "seed": "seed",
    "save_steps": "save_steps",
    "logging_steps": "logging_steps",
    "output_dir": "output_dir",
}


@cache
def _grpo_config_fields() -> frozenset[str]:
    from trl import GRPOConfig

    return frozenset(f.name for f in dataclasses.fields(GRPOConfig) if f.init)


def _default_trl_arguments() -> dict[str, Any]:
    """What we set differently from TRL's defaults; every key may be replaced through `trl_overrides`."""
    import torch

    return {
        "report_to": "none",  # no tracker is reachable from a silo network; logs go to trainer_state.json
        # TRL defaults to bf16 (and refuses to start on a CPU-only machine unless told use_cpu) and to
        # gradient checkpointing: both are for large models on GPUs. The tiny VLM trains in float32.
        "bf16": False,
        "activation_checkpointing": False,
        "use_cpu": not torch.cuda.is_available(),
        "save_strategy": "steps",
        "logging_strategy": "steps",
    }


def _world_size() -> int:
    """Processes in this run as the launcher (accelerate launch, torchrun) announces them; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class GRPOSettings(StrictModel):
    """GRPO run settings we own; anything else of `trl.GRPOConfig` goes through `trl_overrides`."""

    output_dir: Path = Field(
        description="Directory for checkpoints (checkpoint-N), logs (trainer_state.json) and the final model (final/).",
    )
    steps: int = Field(300, gt=0, description="Optimizer steps (GRPOConfig.max_steps); ~90 s for the demo's VLM on 2 cores.")
    num_generations: int = Field(
        8, ge=2,
        description="Completions sampled per prompt (the GRPO group). Advantages are each completion's reward minus "
        "its group's mean, over the group's std (TRL's scale_rewards='group'), so at least 2 are needed; 8 makes "
        "it likely that the right answer is among them (8 colours), which a group-relative reward needs (docs/grpo.md).",
    )
    per_device_train_batch_size: int = Field(
        64, gt=0,
        description="Completions (not prompts) per process per optimizer step: 64 = 8 prompts x 8 generations. "
        "Times the number of processes it must be a multiple of num_generations; with several processes it must "
        "be one itself, so every process scores whole groups.",
    )
    learning_rate: float = Field(
        3e-4, gt=0, allow_inf_nan=False,
        description="AdamW learning rate (linear decay to 0). TRL's 1e-6 is for billion-parameter models; "
        "measured on the demo's 1.8M-parameter tiny VLM: 1e-3 destroys colour answers, 1e-5 barely moves "
        "(docs/grpo.md).",
    )
    beta: float = Field(
        0.2, allow_inf_nan=False,
        description="Weight of the k3 KL penalty to the frozen reference policy; must be > 0 (TRL then keeps the "
        "reference and logs `kl`).",
    )
    max_completion_length: int = Field(
        4, gt=0, description="Most tokens generated per answer; easy-VQA answers are one word plus the end token.",
    )
    temperature: float = Field(
        1.0, gt=0, allow_inf_nan=False,
        description="Sampling temperature of the completions (TRL applies it to the log-probs it trains on too).",
    )
    seed: int = Field(0, description="Seed of sampling, prompt order and initialisation of anything random.")
    train_vision: bool = Field(
        False,
        description="Also update the vision tower and projector. Off by default: GRPO then reshapes how the "
        "language model reads the (frozen) image features, and the noisy policy gradient of a few hundred steps "
        "cannot erode what SFT taught the vision tower (docs/grpo.md has the measurements).",
    )
    save_steps: int = Field(
        20, gt=0, description="Write a resumable checkpoint (output_dir/checkpoint-N) every this many steps.",
    )
    logging_steps: int = Field(
        5, gt=0, description="Log loss, reward, kl, ... every this many steps (trainer_state.json, console).",
    )
    trl_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra trl.GRPOConfig fields, passed through as given (e.g. bf16, gradient_accumulation_steps, "
        "use_vllm, loss_type, scale_rewards). Keys must be GRPOConfig fields not set by the fields above.",
    )

    @field_validator("beta")
    @classmethod
    def _positive_beta(cls, beta: float) -> float:
        if beta <= 0:
            raise ValueError(
                f"beta must be > 0, got {beta}: the KL penalty to the frozen reference policy is what keeps the "
                "policy from drifting away from it (and from gaming the silos' reward models); set beta > 0, "
                "e.g. 0.2"
            )
        return beta

    @model_validator(mode="after")
    def _valid_for_trl(self) -> GRPOSettings:
        self._check_override_keys()
        self._check_group_fits_batch()
        try:
            self.to_grpo_config()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"trl.GRPOConfig rejects these settings: {exc}") from exc
        return self

    def _check_override_keys(self) -> None:
        owned = {trl_name: ours for ours, trl_name in _OWNED.items()}
        clashing = sorted(k for k in self.trl_overrides if k in owned)
        if clashing:
            fixes = ", ".join(f"{k!r} -> GRPOSettings.{owned[k]}" for k in clashing)
            raise ValueError(f"trl_overrides sets {clashing}, which GRPOSettings owns; set them with the settings "
                             f"fields instead ({fixes})")
        fields = _grpo_config_fields()
        unknown = sorted(k for k in self.trl_overrides if k not in fields)
        if unknown:
            hints = "; ".join(
                f"{k!r}: did you mean {close}?" for k in unknown
                if (close := difflib.get_close_matches(k, fields, n=3))
            )
            raise ValueError(
                f"trl_overrides has unknown key(s) {unknown}: each key must be a trl.GRPOConfig field "
                f"(see `help(trl.GRPOConfig)`){'; ' + hints if hints else ''}"
            )

    def _check_group_fits_batch(self) -> None:
        # TRL's own check, restated with the fix: every prompt's group must sit in one generation batch.
        overrides = self.trl_overrides
        processes = _world_size()
        # The next multiple of num_generations up from the batch size asked for, for the error messages.
        suggestion = -(-self.per_device_train_batch_size // self.num_generations) * self.num_generations
        if overrides.get("generation_batch_size") is not None:
            batch, how = int(overrides["generation_batch_size"]), "trl_overrides.generation_batch_size"
        else:
            steps_per_generation = (overrides.get("steps_per_generation")
                                    or overrides.get("gradient_accumulation_steps", 1))
            batch = self.per_device_train_batch_size * processes * int(steps_per_generation)
            how = (f"per_device_train_batch_size ({self.per_device_train_batch_size}) x processes ({processes}) "
                   f"x steps_per_generation ({steps_per_generation})")
        if batch % self.num_generations:
            raise ValueError(
                f"{how} = {batch} completions per generation batch, which is not a multiple of num_generations "
                f"({self.num_generations}): GRPO compares the {self.num_generations} completions of a prompt within "
                f"one batch. Set per_device_train_batch_size to a multiple of {self.num_generations} "
                f"(e.g. {suggestion}), or pick a num_generations that divides {batch}"
            )
        if processes > 1 and self.per_device_train_batch_size % self.num_generations:
            # TRL deals the repeated prompts out per_device_train_batch_size at a time, process by process
            # (the figure in GRPOTrainer._get_train_sampler), and each process scores only its share: a group
            # cut across processes would be ranked in parts by a group-relative reward (group_top).
            raise ValueError(
                f"with {processes} processes, per_device_train_batch_size ({self.per_device_train_batch_size}) must "
                f"be a multiple of num_generations ({self.num_generations}): TRL hands each process "
                f"{self.per_device_train_batch_size} completions at a time, so a prompt's group would be split "
                "between processes and each part ranked on its own by the group_top reward. Set "
                f"per_device_train_batch_size to a multiple of {self.num_generations} (e.g. {suggestion})"
            )

    def to_grpo_config(self) -> Any:
        """The `trl.GRPOConfig` for these settings: our defaults, then `trl_overrides`, then our fields."""
        from trl import GRPOConfig

        arguments = _default_trl_arguments()
        if "gradient_checkpointing" in self.trl_overrides:
            # Deprecated alias in transformers 5: our activation_checkpointing default would silently win over it.
            arguments.pop("activation_checkpointing")
        arguments.update(self.trl_overrides)
        arguments.update({trl_name: getattr(self, ours) for ours, trl_name in _OWNED.items()})
        arguments["output_dir"] = str(self.output_dir)
        return GRPOConfig(**arguments)


def grpo_dataset(records: Sequence[VQARecord]) -> Any:
    """A `datasets.Dataset` GRPOTrainer can read, with the columns the rewards need.

    `prompt` is conversational with an image placeholder; `image` is decoded
    (RGB PIL) lazily from `image_path` when a row is read, so building a
    dataset of thousands of questions costs no image decoding.
    """
    from datasets import Dataset, Image

    records = list(records)
    if not records:
        raise ValueError("GRPO needs at least one record; the prompt split is empty")
    for index, record in enumerate(records):
        if not isinstance(record, VQARecord):
            raise ValueError(f"records[{index}] is a {type(record).__name__}, expected a VQARecord")
    missing = sorted({str(r.image_path) for r in records if not Path(r.image_path).is_file()})
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) not found, e.g. {missing[0]}")
    dataset = Dataset.from_dict({
        "prompt": [user_prompt(r.question) for r in records],
        "image": [str(r.image_path) for r in records],
        "image_path": [str(r.image_path) for r in records],
        "question": [r.question for r in records],
        "answer": [r.answer for r in records],
        "kind": [r.kind for r in records],
    })
    return dataset.cast_column("image", Image(mode="RGB"))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-numbered `checkpoint-N` directory in `output_dir`, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = get_last_checkpoint(str(output_dir))
    return Path(found) if found else None


def _checkpoint_state(checkpoint: Path) -> TrainerState:
    return TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))  # transformers' TRAINER_STATE_NAME


RewardFunction = Callable[..., list[float]]


class StepProgress(TrainerCallback):
    """One progress bar per GRPO run: steps done, and the latest logged mean reward and KL."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.description, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "reward" in logs:
            self.bar.set_postfix(reward=f"{float(logs['reward']):.3f}", kl=f"{float(logs.get('kl', 0.0)):.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_grpo(policy_dir: str | Path, records: Sequence[VQARecord], reward: RewardFunction,
               settings: GRPOSettings, *, resume: bool = False, callbacks: Sequence[Any] = ()) -> Path:
    """Align the policy at `policy_dir` with GRPO on `records`; returns `settings.output_dir / "final"`.

    The frozen KL reference is the checkpoint at `policy_dir` (TRL reloads it
    from there), so a resumed run must be given the same `policy_dir`.
    `resume=True` continues from the latest `checkpoint-N` in output_dir
    (model, optimizer, scheduler, RNG and step count); without it, an
    output_dir that already holds checkpoints is refused rather than mixed.
    Works unchanged under `accelerate launch`: every process runs this
    function; TRL shards generation and gathers rewards. `callbacks` are
    `transformers.TrainerCallback`s (e.g. `answer_eval.AccuracyCallback`).
    """
    from trl import GRPOTrainer

    if not callable(reward):
        raise ValueError(f"reward must be a callable reward function, got {type(reward).__name__}")
    policy_dir = Path(policy_dir).resolve()  # TRL reloads the reference from this path
    output_dir = Path(settings.output_dir)
    checkpoint = latest_checkpoint(output_dir)
    if resume and checkpoint is None:
        raise FileNotFoundError(f"{output_dir}: no checkpoint-N to resume from; run without resume "
                                "(checkpoints are written every save_steps steps)")
    if not resume and checkpoint is not None:
        raise FileExistsError(f"{output_dir} already holds {checkpoint.name}: pass resume=True to continue that run, "
                              "or choose an empty output_dir")

    args = settings.to_grpo_config()
    prompts_per_batch = args.generation_batch_size // args.num_generations
    if len(records) < prompts_per_batch:
        raise ValueError(f"{len(records)} records cannot fill one generation batch of {prompts_per_batch} distinct "
                         f"prompts ({args.generation_batch_size} completions / {args.num_generations} generations); "
                         "give more records or lower per_device_train_batch_size")
    dataset = grpo_dataset(records)
    # transformers 5.23 resuming from a checkpoint at max_steps trains one step more (measured: step 5 of 4), so a
    # run interrupted after its last checkpoint is finished from that checkpoint's weights and state, untrained.
    reached = _checkpoint_state(checkpoint).global_step if checkpoint is not None else 0
    if reached > args.max_steps:
        raise ValueError(f"{checkpoint} is at step {reached}, past steps={args.max_steps}: give the run's own steps, "
                         "or an empty output_dir for a shorter run")
    finished = checkpoint is not None and reached == args.max_steps
    model, processor = load_vlm(checkpoint if finished else policy_dir)
    if not settings.train_vision:
        for module in (model.model.vision_tower, model.model.multi_modal_projector):
            module.requires_grad_(False)
    trainer = GRPOTrainer(model=model, processing_class=processor, reward_funcs=[reward], args=args,
                          train_dataset=dataset, callbacks=list(callbacks) or None)
    # The Trainer prints every log dict (PrinterCallback, or ProgressCallback's bar.write); people get one bar
    # per run instead, and the metrics stay in trainer_state.json's log_history.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not args.disable_tqdm:
        trainer.add_callback(StepProgress(description=f"GRPO {getattr(reward, '__name__', 'reward')}"))
    if finished:
        logger.info("GRPO already reached step %d at %s: saving that policy, training nothing", args.max_steps,
                    checkpoint)
        trainer.state = _checkpoint_state(checkpoint)
    else:
        if checkpoint is not None:
            logger.info("resuming GRPO from %s", checkpoint)
        with warnings.catch_warnings():
            # TRL 1.16 reads transformers' deprecated `is_gradient_checkpointing` when training starts
            # (trl/models/utils.py): a FutureWarning about TRL's code, printed once per GRPO run.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    trainer.save_state()
    final = output_dir / FINAL_DIR
    trainer.save_model(str(final))  # model + processor, from the main process, unwrapped
    if trainer.is_world_process_zero():
        record = {
            "policy_dir": str(policy_dir),
            "reward": getattr(reward, "__name__", type(reward).__name__),
            "records": len(records),
            "settings": settings.model_dump(mode="json"),
            "resumed_from": checkpoint.name if checkpoint is not None else None,
            "global_step": trainer.state.global_step,
            "processes": trainer.accelerator.num_processes,
            "final": str(final),
        }
        (output_dir / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        logger.info("GRPO policy saved to %s", final)
    trainer.accelerator.wait_for_everyone()
    return final
