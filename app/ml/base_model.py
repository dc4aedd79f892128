"""Loading a base model's weights and tokenizer, the same way for training and serving.

Safetensors only and no code from the model directory: a base model named in `TUNESERVE_BASE_MODELS` may come
from anywhere, so nothing in it is unpickled or executed.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported when a model is loaded, not with this module
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


MODEL_CONSTRUCTION = threading.Lock()  # held while a model is built or loaded (app.ml.modules too)


def load_causal_lm(
    name_or_path: str, *, device: torch.device, dtype: torch.dtype, attn_implementation: str
) -> PreTrainedModel:
    """The model on `device` with weights in `dtype`, with `attn_implementation` unless the architecture needs
    another (`attention_for`). Raises OSError or ValueError when it cannot be loaded (missing files, no
    safetensors weights, an unknown architecture); callers say what that means for them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # One load at a time per process: from_pretrained builds the model on the meta device through process-wide
    # patches, and two loads at once (the engine loads base models on two threads) left tied embeddings on the
    # meta device ("Cannot copy out of meta tensor").
    with MODEL_CONSTRUCTION:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            config=config,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation=attention_for(config, attn_implementation),
        )
    # transformers wraps PreTrainedModel.to with functools.wraps, and mypy types the result as a plain callable
    # whose first argument is `self`, so the device looks like the model argument.
    return model.to(device)  # type: ignore[arg-type]


# Attention implementations that would compute a different function for some architectures, by name (the
# per-example training kernel is registered by the worker, worker/training/attention.py, under this name).
_DROPS_SOFTCAPPING = frozenset({"sdpa", "tuneserve_segments"})  # Gemma 2's attention logit soft-capping
_DROPS_SLIDING_WINDOW = frozenset({"tuneserve_segments"})  # it builds no mask, so it applies no window


def attention_for(config: PretrainedConfig, preferred: str) -> str:
    """`preferred`, unless it would silently compute a different function for this architecture: then eager
    attention (which computes soft-capping) or SDPA (whose masks transformers builds with the sliding window).
    FlashAttention and the worker's packed varlen kernel compute both, and are kept."""
    if getattr(config, "attn_logit_softcapping", None) and preferred in _DROPS_SOFTCAPPING:
        return "eager"
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or []) or (
        getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    )
    if sliding and preferred in _DROPS_SLIDING_WINDOW:
        return "sdpa"
    return preferred


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer (no remote code). Raises OSError or ValueError when it cannot be loaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
