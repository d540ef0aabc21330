"""A tiny LLaVA (CLIP vision tower + Llama text model) built from a config.

Why build instead of download: there is no model hub at run time. The tiny
model is saved as an ordinary Hugging Face checkpoint (config, safetensors,
tokenizer, processor with chat template) and every consumer loads it back with
`from_pretrained(path)`, so a real local LLaVA-family checkpoint is a drop-in.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from mor_secure.config import StrictModel
from mor_secure.data.text_rules import CHAT_TEMPLATE_MARKERS

from .digests import directory_digest

IMAGE_TOKEN = "<image>"
END_TOKEN = "<|end|>"
PAD_TOKEN = "<pad>"
# One list, in data/text_rules.py (no torch there), so the importer refuses exactly these tokens in users' text.
SPECIAL_TOKENS = list(CHAT_TEMPLATE_MARKERS)

# One turn per message; content may be a string or a list of {"type": "image"|"text"} parts
# (the format TRL's GRPOTrainer and processors use for vision-language prompts).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<image>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


class TinyVLMConfig(StrictModel):
    """Sizes of the tiny LLaVA. Defaults give ~1.8M parameters that SFT in under a minute on 2 cores."""

    image_size: int = Field(64, gt=0, description="Square input resolution; easy-VQA images are 64x64.")
    patch_size: int = Field(16, gt=0, description="ViT patch size; 64/16 -> 16 image tokens, each carrying enough colour and shape signal to learn in a few hundred steps.")
    vision_hidden: int = Field(128, gt=0, description="CLIP vision tower width.")
    vision_layers: int = Field(2, gt=0, description="CLIP vision tower depth.")
    text_hidden: int = Field(160, gt=0, description="Llama text model width.")
    text_layers: int = Field(3, gt=0, description="Llama text model depth.")
    attention_heads: int = Field(4, gt=0, description="Heads in both towers; must divide both widths.")
    vocab_size: int = Field(400, gt=len(SPECIAL_TOKENS), description="BPE vocabulary size to train.")
    max_positions: int = Field(256, gt=0, description="Longest token sequence (image tokens included).")
    seed: int = Field(0, description="Seed for weight initialisation.")


def train_bpe_tokenizer(corpus: Iterable[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`, with the chat special tokens and template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=END_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",  # generation appends on the right
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_vlm(output_dir: str | Path, corpus: Iterable[str], config: TinyVLMConfig | None = None) -> Path:
    """Build and save tokenizer, processor and a randomly initialised tiny LLaVA to `output_dir`."""
    config = config or TinyVLMConfig()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=config.vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",  # drop CLS: one token per patch
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=4 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.attention_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
    )
    text = LlamaConfig(
        hidden_size=config.text_hidden,
        intermediate_size=4 * config.text_hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.attention_heads,
        num_key_value_heads=config.attention_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=config.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(llava)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def load_vlm(path: str | Path) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load any LLaVA-family checkpoint (the tiny one or a real one) from a local path."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model checkpoint (no config.json); build one with `mor coordinator build-vlm`")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    return model, processor


def checkpoint_digest(path: str | Path) -> str:
    """SHA-256 over a checkpoint directory's top-level files (names and contents, sorted by name): its identity.

    What a model trained on top of a checkpoint records instead of the
    checkpoint's path, so it can be moved between machines and still refuse a
    different backbone.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model checkpoint (no config.json)")
    return directory_digest(path, recursive=False)


def user_prompt(question: str) -> list[dict]:
    """The conversational prompt for one question about one image."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
