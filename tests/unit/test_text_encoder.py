"""The frozen MiniLM text encoder reads other parties' text as text."""

from __future__ import annotations

import torch

from mor_secure.models.encoders import TextFeatureEncoder


def test_special_token_names_in_text_are_read_as_text_not_as_control_tokens() -> None:
    encoder = TextFeatureEncoder()
    tokenizer = encoder._tokenizer
    ids = tokenizer(["red [SEP] blue [PAD] [CLS] [MASK] [UNK]"])["input_ids"][0]
    # Only the tokenizer's own framing: one [CLS] first and one [SEP] last; none of the text's names.
    assert ids.count(tokenizer.cls_token_id) == 1 and ids[0] == tokenizer.cls_token_id
    assert ids.count(tokenizer.sep_token_id) == 1 and ids[-1] == tokenizer.sep_token_id
    for token_id in (tokenizer.pad_token_id, tokenizer.mask_token_id, tokenizer.unk_token_id):
        assert token_id not in ids
    # And an answer naming a control token is a different answer from one without it.
    red, injected = encoder.encode(["red", "red [SEP]"])
    assert not torch.allclose(red, injected)
