"""Serving: base models, a LoRA adapter cache and a batching scheduler that mixes adapters in one batch."""

from app.inference.engine import InferenceEngine
from app.inference.handle import GenerationHandle
from app.inference.types import AdapterRef, Constraint, Finished, GenerationRequest, TextDelta, TokenLogprob

__all__ = [
    "AdapterRef",
    "Constraint",
    "Finished",
    "GenerationHandle",
    "GenerationRequest",
    "InferenceEngine",
    "TextDelta",
    "TokenLogprob",
]
