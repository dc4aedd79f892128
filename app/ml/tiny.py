"""The built-in `tuneserve-tiny` base model: a small Llama with random weights and a byte-level tokenizer.

It makes every path (training, inference, tests) runnable offline. It is built deterministically (fixed seed,
no timestamps) into the data dir on first use and then loaded through the ordinary `from_pretrained` path,
exactly like a real model, so nothing downstream special-cases it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.ml.build_once import build_once

if TYPE_CHECKING:  # transformers is imported when the model is built, not with this module
    from transformers import PreTrainedTokenizerFast

TINY_MODEL_NAME = "tuneserve-tiny"
# Bump when the recipe below changes, so an old build on disk is never mistaken for the new one.
TINY_MODEL_VERSION = 1
TINY_SEED = 1234
LM_HEAD_SCALE = 8.0
TINY_CONTEXT_LENGTH = 2048

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|im_end|>"  # end of turn and end of text: one stop token for chat and completions
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN]

# ChatML-style. The assistant turn ends with <|im_end|>, which is what training supervises and what
# generation stops on. Tools, when given, are rendered as a system block ahead of the conversation.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\n# Tools\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message.get('tool_calls') %}{{ message['tool_calls'] | tojson }}"
    "{% elif message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}{{ part.get('text', '') }}{% endfor %}"
    "{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# About 3.3 M parameters: big enough to learn small tasks in seconds on a CPU, small enough for tests.
TINY_ARCH: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=TINY_CONTEXT_LENGTH,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def tiny_model_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "models" / f"{TINY_MODEL_NAME}-v{TINY_MODEL_VERSION}"


def ensure_tiny_model(data_dir: Path) -> Path:
    """Return the directory of the tiny model under `data_dir`, building it on first use (see `build_once`)."""
    return build_once(tiny_model_dir(data_dir), build_tiny_model)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, so token id == byte value for ids 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0..255 are bytes, then the special tokens. Lossless for any UTF-8 text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN],
        model_max_length=TINY_CONTEXT_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(out_dir: Path, *, vocab_size: int | None = None, seed: int = TINY_SEED, **arch: Any) -> None:
    """Write config, safetensors weights, generation config and tokenizer into `out_dir`.

    `vocab_size` may exceed the tokenizer's (the benchmark uses 32k so that the LM head's cost is realistic);
    the extra rows are simply never produced by the tokenizer.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    n_tokens = len(tokenizer)
    config = LlamaConfig(
        vocab_size=max(vocab_size or n_tokens, n_tokens),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **{**TINY_ARCH, **arch},
    )
    # Fork the RNG so building the model never disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # At the usual init (std 0.02) a frozen random LM head caps the logit margin that a normalised hidden
        # state can reach, so even a perfectly fit adapter keeps a loss near 1 nat. A larger head lets
        # fine-tuning reach confident predictions, as it does on a pretrained model.
        with torch.no_grad():
            model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
