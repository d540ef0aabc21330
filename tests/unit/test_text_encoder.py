"""The frozen MiniLM text encoder reads other parties' text as text."""

from __future__ import annotations

import pytest
import torch

from mor_secure.models import encoders
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


def test_a_served_text_cache_keeps_the_most_recent_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every string a caller sent stayed cached for the server's life; one call may still bring more than the cap."""
    monkeypatch.setattr(encoders, "SERVED_TEXT_EMBEDDINGS", 3)
    served, own = TextFeatureEncoder(serving=True), TextFeatureEncoder()
    texts = [f"what colour is shape {i}?" for i in range(5)]
    assert torch.allclose(served.encode(texts), own.encode(texts), atol=1e-6)
    assert len(served._cache) == 3 and len(own._cache) == 5
    served.encode(texts[:1])  # evicted, encoded again
    assert texts[0] in dict(served._cache.items()) and len(served._cache) == 3
