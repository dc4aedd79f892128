"""Loading a base model's weights and tokenizer, the same way for training and serving.

Safetensors only and no code from the model directory: a base model named in `TUNESERVE_BASE_MODELS` may come
from anywhere, so nothing in it is unpickled or executed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported when a model is loaded, not with this module
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def load_causal_lm(
    name_or_path: str, *, device: torch.device, dtype: torch.dtype, attn_implementation: str
) -> PreTrainedModel:
    """The model on `device` with weights in `dtype`, with `attn_implementation` unless the architecture needs
    another (`attention_for`). Raises OSError or ValueError when it cannot be loaded (missing files, no
    safetensors weights, an unknown architecture); callers say what that means for them."""
    from transformers import AutoConfig, AutoModelForCausalLM

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


def attention_for(config: PretrainedConfig, preferred: str) -> str:
    """`preferred`, unless it would compute a different function for this architecture. Attention logit
    soft-capping (Gemma 2) is computed by the eager kernel and FlashAttention only: SDPA and the per-example
    training kernel would silently drop it. Sliding-window layers get their window from transformers' masks, which
    the per-example kernel (it builds no mask) would not apply."""
    if getattr(config, "attn_logit_softcapping", None) and preferred != "flash_attention_2":
        return "eager"
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or []) or (
        getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    )
    if sliding and preferred not in ("eager", "sdpa", "flash_attention_2"):
        return "sdpa"
    return preferred


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer (no remote code). Raises OSError or ValueError when it cannot be loaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
