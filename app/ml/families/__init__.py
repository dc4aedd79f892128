"""Built-in family models: `tiny-llama3`, `tiny-qwen2`, `tiny-qwen3`, `tiny-mistral`, `tiny-gemma2`, `tiny-phi3`.

Each is a few-million-parameter random model of the family's real architecture class, with a BPE tokenizer
trained locally that carries the family's special tokens, and the family's published chat template
(`templates/<family>.jinja`, the Jinja text of the family's instruct `tokenizer_config.json`). They exist so
that training, masking, serving and stop conditions are proven on what differs between families (biases, fused
projections, soft-capping, tied embeddings, templates) without downloading anything. See `build.py`.
"""

from __future__ import annotations

from app.ml.families.build import build_family_model, ensure_family_model, family_model_dir
from app.ml.families.specs import FAMILIES, FAMILY_PREFIX, Family, family_of_model_name

__all__ = [
    "FAMILIES",
    "FAMILY_PREFIX",
    "Family",
    "build_family_model",
    "ensure_family_model",
    "family_model_dir",
    "family_of_model_name",
]
