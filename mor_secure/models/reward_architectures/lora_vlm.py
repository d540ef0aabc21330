"""Architecture a: LoRA adapters (PEFT) on the shared VLM backbone + a scalar head.

The backbone is loaded with `from_pretrained(path)` and frozen; only the LoRA
matrices and the head are trained (and privatised). The score is

    head(h_last) + a * [log p_lora(response | image, prompt) - log p_ref(response | image, prompt)] + b

where h_last is the last token's final hidden state of "prompt + response + end
token" (left padding puts it at the last position), p_lora is the backbone
with the silo's adapters and p_ref the same backbone with them disabled: the
implicit reward of DPO (Rafailov et al. 2023), beta * log(pi / pi_ref). The
head starts at zero and a at one. Measured here, a hidden-state head alone
stayed at chance after the few DP steps a CPU silo can afford (24 steps, 78 s);
the log-ratio learns the silo's reliable kind in 20 DP steps (0.96 pairwise).

Why the ratio and not log p_lora alone (what this model scored before): an
untrained adapter then scores every answer by the shared VLM's own
likelihood, so the silo's reward echoes the reference policy on every kind,
whatever its own data say. With the demo's reference that echo alone gave
0.7-0.8 pairwise accuracy on kinds the silo's labels say nothing about, and
GRPO under that reward merely sharpened the policy (docs/results.md). The
ratio is zero until the silo's data move the adapters, so the score is what
the silo learned. It costs one extra forward pass, without gradients.

A prompt or response may not contain the tokenizer's added tokens (`<image>`,
`<|end|>`, `<|assistant|>`, ...): the tokenizer matches them in raw text, so
`<image>` in a question would ask for a second image and `<|end|>` in an
answer would end the turn the score is about. They are refused by name
(ValueError), and `reserved_text` lists them for the silo's request checks.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from ..caches import LRUCache
from ..images import ImageInput, as_square, image_key
from ..reward_model import LocalResources, RewardModel, Standardisation, register
from ..tiny_vlm import END_TOKEN, checkpoint_digest, load_vlm, user_prompt

ADAPTER_DIR = "adapter"
HEAD_FILE = "head.safetensors"
# Rows per no-grad pass of the frozen backbone when filling the reference-likelihood cache.
_REFERENCE_BATCH = 256
# Bound on cached reference likelihoods (one float each, plus the key): ~100 MB at most.
_REFERENCE_CACHE_ROWS = 500_000
# Attention query/value projections of both towers: the LoRA paper's (Hu et al. 2021) default targets.
LORA_TARGETS = ("q_proj", "v_proj")


class LoraVLMScorer(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        # nn.Linear(1, 1) rather than a bare nn.Parameter: Opacus computes per-sample gradients per layer type.
        self.likelihood_weight = nn.Linear(1, 1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.likelihood_weight.weight.fill_(1.0)
            self.likelihood_weight.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                response_mask: torch.Tensor, reference_likelihood: torch.Tensor) -> torch.Tensor:
        vlm = self.backbone.get_base_model()
        out = vlm(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                  output_hidden_states=True, use_cache=False)
        log_ratio = _response_log_likelihood(out.logits, input_ids, response_mask) - reference_likelihood
        hidden = out.hidden_states[-1][:, -1, :]
        return (self.head(hidden) + self.likelihood_weight(log_ratio)).squeeze(-1)

    @torch.no_grad()
    def reference_likelihood(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                             response_mask: torch.Tensor) -> torch.Tensor:
        """log p_ref(response | image, prompt), (batch, 1): the backbone with its adapters disabled (frozen)."""
        with self.backbone.disable_adapter():
            logits = self.backbone.get_base_model()(input_ids=input_ids, attention_mask=attention_mask,
                                                    pixel_values=pixel_values, use_cache=False).logits
        return _response_log_likelihood(logits, input_ids, response_mask)


def _response_log_likelihood(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities, shape (batch, 1). Token t is predicted by the logits at t-1."""
    log_probs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    token_log_probs = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_log_probs * response_mask[:, 1:]).sum(-1, keepdim=True)


@register
class LoraVLMRewardModel(RewardModel):
    architecture = "lora_vlm"

    def __init__(self, *, base_model: str | Path, rank: int = 8, alpha: int = 16,
                 standardisation: Standardisation | None = None, adapter_dir: Path | None = None, seed: int = 0):
        torch.manual_seed(seed)
        vlm, self.processor = load_vlm(base_model)
        for parameter in vlm.parameters():
            parameter.requires_grad_(False)
        with warnings.catch_warnings():
            # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` (peft_model.py:184): a
            # FutureWarning about PEFT's code, not ours, printed on every silo start.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if adapter_dir is None:
                config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
                backbone = get_peft_model(vlm, config)
            else:
                # is_trainable keeps the LoRA weights marked trainable, so trainable_parameters() reports
                # what DP-SGD trained; scoring runs under no_grad either way.
                backbone = PeftModel.from_pretrained(vlm, adapter_dir, is_trainable=True)
        super().__init__(LoraVLMScorer(backbone, vlm.config.text_config.hidden_size), standardisation)
        # The backbone's digest, not its path: a path is this machine's; the digest says which VLM it must be.
        self.settings = {"base_model_digest": checkpoint_digest(base_model), "rank": rank, "alpha": alpha}
        self.image_size = vlm.config.vision_config.image_size
        self._reference_cache: LRUCache[tuple[str, str, str], torch.Tensor] = LRUCache(_REFERENCE_CACHE_ROWS)
        # Every token the tokenizer matches in raw text before BPE: the chat's control tokens and <image>.
        self.reserved_text = tuple(sorted(t.content for t in self.processor.tokenizer.added_tokens_decoder.values()))

    def _check_text(self, label: str, texts: Sequence[str]) -> None:
        for index, text in enumerate(texts):
            for token in self.reserved_text:
                if token in text:
                    raise ValueError(f"{label}[{index}] contains {token!r}, a control token of this model's "
                                     "tokenizer; remove it from the text")

    def side_inputs(self, images: Sequence[ImageInput], prompts: Sequence[str],
                    responses: Sequence[str]) -> tuple[torch.Tensor, ...]:
        self._check_text("prompts", prompts)
        self._check_text("responses", responses)
        texts = [self.processor.apply_chat_template(user_prompt(p), add_generation_prompt=True, tokenize=False)
                 + r + END_TOKEN for p, r in zip(prompts, responses)]
        # Square at the vision tower's size first: the processor keeps the aspect ratio when it scales the
        # shortest edge, so a thin image would grow by its aspect ratio (`as_square`).
        square = [as_square(p, self.image_size) for p in images]
        batch = self.processor(images=square, text=texts, return_tensors="pt", padding=True)
        # Left padding: the response and end token are the last tokens of each row.
        response_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.float32)
        for row, response in enumerate(responses):
            n = len(self.processor.tokenizer(response + END_TOKEN, add_special_tokens=False)["input_ids"])
            response_mask[row, -n:] = 1.0
        tensors = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], response_mask)
        keys = [(image_key(i), p, r) for i, p, r in zip(images, prompts, responses)]
        return (*tensors, self._reference_likelihoods(keys, tensors))

    def _reference_likelihoods(self, keys: list[tuple[str, str, str]],
                               tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The frozen backbone's log-likelihood of each row, computed once per (image, prompt, response).

        It is an input, not part of the DP-trained forward: it never changes,
        so training computes it once per pair instead of once per epoch, and
        GRPO, whose prompts and one-word answers recur from step to step,
        mostly finds it cached (the second forward pass is what made the
        fused reward's GRPO step 1.32x a constant reward's; docs/benchmarks.md).
        """
        found = self._reference_cache.get_many(keys)
        missing = sorted({row for row, key in enumerate(keys) if key not in found})
        was_training = self.module.training
        self.module.eval()
        for start in range(0, len(missing), _REFERENCE_BATCH):
            rows = torch.tensor(missing[start:start + _REFERENCE_BATCH])
            values = self.module.reference_likelihood(*(t[rows] for t in tensors))
            for row, value in zip(rows.tolist(), values):
                found[keys[row]] = value
                self._reference_cache.put(keys[row], value)
        self.module.train(was_training)
        return torch.stack([found[key] for key in keys]) if keys else torch.zeros(0, 1)

    def _save_weights(self, directory: Path) -> dict:
        self.module.backbone.save_pretrained(directory / ADAPTER_DIR)
        _drop_backbone_path(directory / ADAPTER_DIR, self.settings["base_model_digest"])
        save_file({**{f"head.{k}": v for k, v in self.module.head.state_dict().items()},
                   **{f"likelihood_weight.{k}": v for k, v in self.module.likelihood_weight.state_dict().items()}},
                  str(directory / HEAD_FILE))
        return self.settings

    @classmethod
    def _load(cls, directory: Path, settings: dict, standardisation: Standardisation,
              resources: LocalResources) -> LoraVLMRewardModel:
        expected = settings["base_model_digest"]
        if resources.base_model is None:
            raise ValueError(f"{directory}: this lora_vlm reward model needs the shared VLM it was trained on "
                             f"(checkpoint digest {expected[:16]}...); give its directory as base_model")
        found = checkpoint_digest(resources.base_model)
        if found != expected:
            raise ValueError(f"{directory}: base_model {resources.base_model} is not the VLM this reward model was "
                             f"trained on (digest {found[:16]}..., expected {expected[:16]}...); point base_model at "
                             "that checkpoint or retrain the reward model on this one")
        model = cls(base_model=resources.base_model, rank=settings["rank"], alpha=settings["alpha"],
                    standardisation=standardisation, adapter_dir=directory / ADAPTER_DIR)
        model.module.load_state_dict(load_file(str(directory / HEAD_FILE)), strict=False)
        return model


def _drop_backbone_path(adapter_dir: Path, digest: str) -> None:
    """Replace PEFT's record of the backbone's local path by its digest; drop the model card that repeats it.

    PEFT writes `base_model_name_or_path` (an absolute path here, since the
    backbone is loaded from disk) into adapter_config.json and README.md; a
    saved reward model must name no path of the machine it was saved on.
    Loading passes the backbone explicitly, so PEFT never reads the field.
    """
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = f"sha256:{digest}"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (adapter_dir / "README.md").unlink(missing_ok=True)
