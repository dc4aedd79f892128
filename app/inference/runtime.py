"""One loaded base model: weights, tokenizer, LoRA slot tables and what generation needs to know about it."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from app.errors import ServiceUnavailable
from app.inference.lora_slots import LoraSlots
from app.ml.base_model import load_causal_lm, load_tokenizer
from app.ml.chat import end_of_turn_ids
from app.ml.device import pick_device
from app.ml.registry import BaseModelInfo

if TYPE_CHECKING:
    from transformers import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast


class BaseModelRuntime:
    """Loaded once per process per base model (safetensors weights, no remote code)."""

    def __init__(self, info: BaseModelInfo, device: torch.device | None = None, dtype: torch.dtype | None = None):
        picked_device, picked_dtype = pick_device()
        self.device = device or picked_device
        self.dtype = dtype or picked_dtype
        self.info = info
        self.name = info.name
        try:
            self.tokenizer = load_tokenizer(info.name_or_path)
            # The scheduler thread detokenizes with its own instance: a fast tokenizer shared across threads can
            # fail with "Already borrowed" when one thread's call changes its settings while another uses it.
            self.decode_tokenizer = load_tokenizer(info.name_or_path)
            # SDPA with the padding mask the scheduler builds: batched generation pads rows on the left.
            model = load_causal_lm(info.name_or_path, device=self.device, dtype=self.dtype, attn_implementation="sdpa")
        except (OSError, ValueError) as exc:
            raise ServiceUnavailable(
                f"The base model '{info.name}' could not be loaded: {exc}", param="model", code="model_unavailable"
            ) from None
        self.model = model.eval()
        self.model.config.use_cache = True
        self.lora = LoraSlots(self.model)
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.stop_ids = sorted(end_of_turn_ids(self.tokenizer))
        self.stop_ids_tensor = torch.tensor(self.stop_ids, dtype=torch.long, device=self.device)
        self.context_length = int(
            info.context_length or getattr(self.model.config, "max_position_embeddings", None) or 2048
        )

    def forward(self, cache: DynamicCache, **inputs: torch.Tensor | int) -> CausalLMOutputWithPast:
        """The model's forward with `cache` as its KV cache (the argument was renamed within transformers 5)."""
        return self.model(**{self._cache_argument: cache}, use_cache=True, **inputs)

    def next_token_logits(self, cache: DynamicCache, **inputs: torch.Tensor | int) -> torch.Tensor:
        """`forward`, then each row's float32 logits at its last position [rows, vocab]."""
        logits = self.forward(cache, **inputs).logits
        if logits is None:  # a causal LM always returns them; the output type declares them optional
            raise RuntimeError(f"the base model '{self.name}' returned no logits")
        return logits[:, -1, :].float()

    def new_cache(self) -> DynamicCache:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)
