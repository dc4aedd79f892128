"""Logprobs name each token as it reads in the text, leading space included, whatever the tokenizer."""

from __future__ import annotations

import pytest

from app.config import Settings
from app.ml.base_model import load_tokenizer
from app.ml.registry import BaseModelRegistry
from app.services.completions import anchor_token, decode, token_text


@pytest.mark.parametrize("model", ["tiny-mistral", "tiny-llama3", "tuneserve-tiny"])
def test_token_texts_join_to_the_text(tmp_path, model):
    """SentencePiece (Mistral) decodes "▁Yes" alone as "Yes"; joined, the token texts must still read as the text."""
    tokenizer = load_tokenizer(BaseModelRegistry(Settings(data_dir=tmp_path)).resolve(model).name_or_path)
    ids = tokenizer.encode("The answer is Yes, not no.", add_special_tokens=False)
    anchor = anchor_token(tokenizer)
    texts = [token_text(tokenizer, token, anchor) for token in ids]
    assert "".join(texts).lstrip() == decode(tokenizer, ids).lstrip()
    assert any(text.startswith(" ") for text in texts)
