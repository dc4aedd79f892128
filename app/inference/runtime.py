"""One loaded base model: weights, tokenizer, LoRA slot tables and what generation needs to know about it."""

from __future__ import annotations

import inspect

import torch

from app.errors import ServiceUnavailable
from app.inference.lora_slots import LoraSlots
from app.ml.chat import end_of_turn_ids
from app.ml.registry import BaseModelInfo


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when present (as training uses), else CPU float32."""
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


class BaseModelRuntime:
    """Loaded once per process per base model (safetensors weights, no remote code)."""

    def __init__(self, info: BaseModelInfo, device: torch.device | None = None, dtype: torch.dtype | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        picked_device, picked_dtype = pick_device()
        self.device = device or picked_device
        self.dtype = dtype or picked_dtype
        self.info = info
        self.name = info.name
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(info.name_or_path, trust_remote_code=False)
            # The scheduler thread detokenizes with its own instance: a fast tokenizer shared across threads can
            # fail with "Already borrowed" when one thread's call changes its settings while another uses it.
            self.decode_tokenizer = AutoTokenizer.from_pretrained(info.name_or_path, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                info.name_or_path,
                dtype=self.dtype,
                use_safetensors=True,
                trust_remote_code=False,
                attn_implementation="sdpa",
            )
        except (OSError, ValueError) as exc:
            raise ServiceUnavailable(
                f"The base model '{info.name}' could not be loaded: {exc}", param="model", code="model_unavailable"
            ) from None
        self.model = model.to(self.device).eval()
        self.model.config.use_cache = True
        self.lora = LoraSlots(self.model)
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.stop_ids = sorted(end_of_turn_ids(self.tokenizer))
        self.stop_ids_tensor = torch.tensor(self.stop_ids, dtype=torch.long, device=self.device)
        self.context_length = int(
            info.context_length or getattr(self.model.config, "max_position_embeddings", None) or 2048
        )

    def forward(self, cache, **inputs):
        """The model's forward with `cache` as its KV cache (the argument was renamed within transformers 5)."""
        return self.model(**{self._cache_argument: cache}, use_cache=True, **inputs)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)
