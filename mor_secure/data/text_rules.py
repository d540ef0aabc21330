"""What text a pair may hold: strings the reward models can encode and tokenize as written.

Why here, in `mor_secure.data` and without torch: the importer checks users'
rows with it, and a silo's serving checks (silo_agent) can apply the same rule
to requests, so a text refused at import is never scored either. Three things
pass JSON and pydantic yet break later:
- a lone surrogate (a "\\ud800" escape decodes to one): the string cannot be
  encoded as UTF-8, so training or hashing fails far from the file's line;
- a control character (NUL, ESC, DEL, ...): invisible in logs and reports, and
  NUL truncates the text in C-level tools; tab and newlines stay allowed;
- a chat-template marker such as "<image>" or "<|assistant|>": the tokenizer
  maps it to its special token, so a prompt holding it forges the template
  (a second image slot, a fake assistant turn, an early end).
"""

from __future__ import annotations

import unicodedata

# The tiny VLM tokenizer's special tokens, in their token-id order: mor_secure/models/tiny_vlm.py builds its
# SPECIAL_TOKENS from this list (the LoRA VLM reward model tokenizes with it); defined here so that importing
# data does not load torch and transformers (~5 s).
CHAT_TEMPLATE_MARKERS: tuple[str, ...] = ("<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<image>")
# Whitespace that tokenizers and answers legitimately hold; every other control character is refused.
_ALLOWED_CONTROLS = frozenset("\t\n\r")


def plain_text_problem(value: str) -> str | None:
    """Why `value` is not plain UTF-8 text without control characters (as "holds ..."), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds a lone surrogate (a \\ud800-\\udfff escape) at character {exc.start}; "
                "write the character itself or its surrogate pair")
    for position, char in enumerate(value):
        if char not in _ALLOWED_CONTROLS and unicodedata.category(char) == "Cc":
            return f"holds control character U+{ord(char):04X} at character {position}; remove it"
    return None


def model_text_problem(value: str) -> str | None:
    """Why `value` cannot be a prompt or response as written (as "holds ..."), or None."""
    problem = plain_text_problem(value)
    if problem is not None:
        return problem
    for marker in CHAT_TEMPLATE_MARKERS:
        if marker in value:
            return (f"holds the chat template's marker {marker!r}, which the tokenizer reads as a special "
                    "token; remove or reword it")
    return None
