"""One loaded base model: weights, tokenizer, LoRA slot tables and what generation needs to know about it."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from app.errors import ServiceUnavailable
from app.inference.grammar import GrammarTokenizer
from app.inference.lora_slots import LoraSlots
from app.ml.base_model import load_causal_lm, load_tokenizer
from app.ml.chat import end_of_turn_ids
from app.ml.device import pick_device
from app.ml.registry import BaseModelInfo

if TYPE_CHECKING:
    from transformers import DynamicCache, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.modeling_outputs import CausalLMOutputWithPast

# On CPU, a forward whose widest linear layer does fewer multiply-adds than this runs on one intra-op thread: waking
# the others costs more than they save on so little work. Measured on 2 cores: 16 tokens through a 256 x 768 layer
# take 60 us on one thread and 112 us on two, and two win from about 64 tokens (12.6 M multiply-adds); a small
# model's decode steps served 8 adapters at 45 req/s on one thread against 33 on two (benchmarks/bench_serve.py).
# A model of real size passes the threshold with a single token, so it only ever runs on all threads.
SINGLE_THREAD_MACS = 1 << 24


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
        check_attention_layers(self.model.config, info.name)
        self.lora = LoraSlots(self.model)
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        # Padded positions are masked out, so any id pads; the tokenizer's pad token where it has one (Llama 3 and
        # Mistral have none).
        self.pad_id = int(self.tokenizer.pad_token_id) if self.tokenizer.pad_token_id is not None else 0
        self.stop_ids_tensor = torch.tensor(self.stop_ids, dtype=torch.long, device=self.device)
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.grammar = GrammarTokenizer(self.tokenizer, vocab, self.stop_ids)
        self.context_length = int(
            info.context_length or getattr(self.model.config, "max_position_embeddings", None) or 2048
        )
        self._threads = torch.get_num_threads()
        self._widest_layer_macs = max(
            layer.base.in_features * layer.base.out_features for layer in self.lora.layers.values()
        )

    def forward(self, cache: DynamicCache, **inputs: torch.Tensor | int) -> CausalLMOutputWithPast:
        """The model's forward with `cache` as its KV cache (the argument was renamed within transformers 5)."""
        ids = inputs.get("input_ids")
        tokens = ids.numel() if isinstance(ids, torch.Tensor) else 1
        with self._intra_op_threads(tokens):
            return self.model(**{self._cache_argument: cache}, use_cache=True, **inputs)

    @contextlib.contextmanager
    def _intra_op_threads(self, tokens: int) -> Iterator[None]:
        """One intra-op thread for a small CPU forward (SINGLE_THREAD_MACS), the process's setting otherwise."""
        if self.device.type != "cpu" or tokens * self._widest_layer_macs >= SINGLE_THREAD_MACS:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            # The count the process had when this model loaded, not the one read now: another model's scheduler may
            # be inside its own small forward at this moment.
            torch.set_num_threads(self._threads)

    def logits(self, cache: DynamicCache, **inputs: torch.Tensor | int) -> torch.Tensor:
        """`forward`, then its logits [rows, positions kept, vocab] in the model's dtype."""
        logits = self.forward(cache, **inputs).logits
        if logits is None:  # a causal LM always returns them; the output type declares them optional
            raise RuntimeError(f"the base model '{self.name}' returned no logits")
        return logits

    def next_token_logits(self, cache: DynamicCache, **inputs: torch.Tensor | int) -> torch.Tensor:
        """`forward`, then each row's float32 logits at its last position [rows, vocab]."""
        return self.logits(cache, **inputs)[:, -1, :].float()

    def new_cache(self) -> DynamicCache:
        """An empty cache whose every layer keeps all keys and values, sliding-window layers included: the window is
        applied by the attention mask transformers builds for those layers. A cache built from the config would
        keep only the window's last tokens in sliding layers, and `KVBatch` joins and trims rows assuming every
        layer holds the same columns as its mask. Its layers append in place (`kv_cache.GrowingLayer`)."""
        from app.inference.kv_cache import GrowingCache  # transformers loads with the first model, not on import

        return GrowingCache()


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a completion: the EOS ids of the model's generation config (an int or a list: Llama 3 lists
    <|end_of_text|>, <|eom_id|> and <|eot_id|>, Phi-3 <|endoftext|>, <|assistant|> and <|end|>), the tokenizer's
    EOS and the end-of-turn markers chat rendering knows (`end_of_turn_ids`). Ids outside the model's vocabulary
    are never generated and are left out."""
    ids = set(end_of_turn_ids(tokenizer))
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in ([configured] if isinstance(configured, int) else configured))
    vocab = model.get_output_embeddings().weight.shape[0]
    return sorted(i for i in ids if 0 <= i < vocab)


# Attention layer kinds whose function the engine's cache and masks reproduce: causal over every earlier token, or
# over the last `sliding_window` tokens (applied through the mask, see `BaseModelRuntime.new_cache`).
SERVABLE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def check_attention_layers(config: PretrainedConfig, name: str) -> None:
    """Refuse a model with attention layers of another kind (Llama 4's chunked attention, linear attention): the
    engine's left-padded, joined and trimmed KV cache is only known to reproduce the two kinds above, and a model
    it cannot serve faithfully is refused rather than served as a different function."""
    text_config = config.get_text_config(decoder=True)
    unsupported = set(getattr(text_config, "layer_types", None) or ()) - SERVABLE_LAYER_TYPES
    if getattr(text_config, "attention_chunk_size", None) is not None:
        unsupported.add("chunked_attention")
    if unsupported:
        raise ServiceUnavailable(
            f"The base model '{name}' cannot be served: its attention layers of kind {', '.join(sorted(unsupported))} "
            "are not supported by the inference engine",
            param="model",
            code="model_unavailable",
        )
