"""Loading a base model's weights and tokenizer, the same way for training and serving.

Safetensors only and no code from the model directory: a base model named in `TUNESERVE_BASE_MODELS` may come
from anywhere, so nothing in it is unpickled or executed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported when a model is loaded, not with this module
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_causal_lm(
    name_or_path: str, *, device: torch.device, dtype: torch.dtype, attn_implementation: str
) -> PreTrainedModel:
    """The model on `device` with weights in `dtype`. Raises OSError or ValueError when it cannot be loaded
    (missing files, no safetensors weights, an unknown architecture); callers say what that means for them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=False,
        attn_implementation=attn_implementation,
    )
    # transformers wraps PreTrainedModel.to with functools.wraps, and mypy types the result as a plain callable
    # whose first argument is `self`, so the device looks like the model argument.
    return model.to(device)  # type: ignore[arg-type]


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer (no remote code). Raises OSError or ValueError when it cannot be loaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
