"""What each built-in family model is made of: architecture class, small sizes with the family's structural
switches kept on, tokenizer style and special tokens, stop tokens, chat template.

Sizes are about tuneserve-tiny's (hidden 256, 4 layers, GQA 4:2) so the same training defaults teach every
family a small task in CI. The switches that make a family differ are kept as the real models have them:
Qwen2's q/k/v biases and tied embeddings, Qwen3's q/k norms, Llama 3's `llama3` RoPE scaling, Gemma 2's
soft-capping, scaled embeddings, (1 + w) norms, alternating sliding-window layers and wider heads, Phi-3's
fused qkv and gate/up projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

FAMILY_PREFIX = "tiny-"
CONTEXT_LENGTH = 2048

_COMMON: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=CONTEXT_LENGTH,
)


@dataclass(frozen=True)
class Family:
    """One family's recipe. Token fields name tokens by text; `stop_tokens` are the EOS ids of the family's
    generation config (the end-of-turn and end-of-text tokens generation stops on)."""

    name: str
    model_class: str  # a transformers class name, e.g. "Qwen2ForCausalLM"
    config_class: str
    arch: dict[str, Any]
    # byte_level: GPT-2 style byte-level BPE (Llama 3, Qwen). sentencepiece: "▁" for spaces, byte fallback
    # for unknown characters, as the SentencePiece-derived tokenizers of Mistral, Gemma and Phi-3.
    tokenizer_style: Literal["byte_level", "sentencepiece"]
    eos_token: str  # the tokenizer's eos_token (what the instruct tokenizer_config names)
    stop_tokens: tuple[str, ...]
    bos_token: str | None = None
    pad_token: str | None = None  # None as in the real tokenizer: code must not rely on a pad token
    unk_token: str | None = None
    control_tokens: tuple[str, ...] = ()  # further special tokens
    added_tokens: tuple[str, ...] = ()  # single tokens that are not special (kept when decoding)
    add_bos: bool = False  # whether encoding text adds BOS, as the real tokenizer does
    # SentencePiece's leading-space convention: "first" prepends "▁" to the text's start, "never" does not.
    prepend_scheme: Literal["first", "never"] = "first"

    @property
    def model_name(self) -> str:
        return f"{FAMILY_PREFIX}{self.name}"


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llama3",
            model_class="LlamaForCausalLM",
            config_class="LlamaConfig",
            arch=dict(
                _COMMON,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=500000.0,
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=1024,
                ),
            ),
            tokenizer_style="byte_level",
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            stop_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
            control_tokens=(
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eom_id|>",
                "<|python_tag|>",
                "<|finetune_right_pad_id|>",
            ),
            add_bos=True,
        ),
        Family(
            name="qwen2",
            model_class="Qwen2ForCausalLM",
            config_class="Qwen2Config",
            arch=dict(_COMMON, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0),
            tokenizer_style="byte_level",
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
            control_tokens=("<|im_start|>",),
            added_tokens=("<tool_call>", "</tool_call>"),
        ),
        Family(
            name="qwen3",
            model_class="Qwen3ForCausalLM",
            config_class="Qwen3Config",
            arch=dict(_COMMON, head_dim=64, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0),
            tokenizer_style="byte_level",
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
            control_tokens=("<|im_start|>",),
            added_tokens=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
        ),
        Family(
            name="mistral",
            model_class="MistralForCausalLM",
            config_class="MistralConfig",
            arch=dict(_COMMON, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=1000000.0, sliding_window=None),
            tokenizer_style="sentencepiece",
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            stop_tokens=("</s>",),
            control_tokens=(
                "[INST]",
                "[/INST]",
                "[TOOL_CALLS]",
                "[AVAILABLE_TOOLS]",
                "[/AVAILABLE_TOOLS]",
                "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]",
            ),
            add_bos=True,
        ),
        Family(
            name="gemma2",
            model_class="Gemma2ForCausalLM",
            config_class="Gemma2Config",
            arch=dict(
                _COMMON,
                head_dim=64,
                query_pre_attn_scalar=64,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                sliding_window=64,
                layer_types=["sliding_attention", "full_attention"] * 2,
            ),
            tokenizer_style="sentencepiece",
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            stop_tokens=("<eos>", "<end_of_turn>"),
            control_tokens=("<start_of_turn>", "<end_of_turn>"),
            add_bos=True,
            prepend_scheme="never",
        ),
        Family(
            name="phi3",
            model_class="Phi3ForCausalLM",
            config_class="Phi3Config",
            arch=dict(
                _COMMON, rms_norm_eps=1e-5, tie_word_embeddings=False, original_max_position_embeddings=CONTEXT_LENGTH
            ),
            tokenizer_style="sentencepiece",
            bos_token="<s>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            unk_token="<unk>",
            stop_tokens=("<|endoftext|>", "<|assistant|>", "<|end|>"),
            control_tokens=("<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
            add_bos=True,
        ),
    )
}


def family_of_model_name(name: str) -> Family | None:
    """The family whose built-in model is called `name` (`tiny-qwen2` -> qwen2), else None."""
    if not name.startswith(FAMILY_PREFIX):
        return None
    return FAMILIES.get(name.removeprefix(FAMILY_PREFIX))
