"""Building a family model: tokenizer trained locally, random weights of the family's architecture, the family's
generation config and chat template, written as an ordinary Hugging Face model directory.

Built on first use into the data dir (as tuneserve-tiny is) and loaded through `from_pretrained` like any
model, so nothing downstream special-cases the families.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.ml.build_once import build_once
from app.ml.families.corpus import tokenizer_corpus
from app.ml.families.specs import FAMILIES, Family

if TYPE_CHECKING:  # transformers is imported when a model is built, not with this module
    from transformers import PreTrainedTokenizerFast

# Bump when a recipe changes, so an old build on disk is never mistaken for the new one.
FAMILY_MODELS_VERSION = 2
SEED = 1234
BPE_VOCAB_SIZE = 2000
# As for tuneserve-tiny: a frozen random LM head at the usual init caps the logit margin an adapter can reach.
LM_HEAD_SCALE = 8.0


def family_model_dir(data_dir: Path, family: str) -> Path:
    return Path(data_dir) / "models" / f"{FAMILIES[family].model_name}-v{FAMILY_MODELS_VERSION}"


def ensure_family_model(data_dir: Path, family: str) -> Path:
    """The directory of the family's built-in model under `data_dir`, built on first use."""
    return build_once(family_model_dir(data_dir, family), lambda out: build_family_model(out, family))


def chat_template(family: Family) -> str:
    return resources.files("app.ml.families").joinpath("templates", f"{family.name}.jinja").read_text()


def build_family_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on a fixed local corpus, with the family's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    core = _train_bpe(family)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=family.bos_token,
        eos_token=family.eos_token,
        unk_token=family.unk_token,
        pad_token=family.pad_token,
        additional_special_tokens=[
            t for t in family.control_tokens if t not in (family.bos_token, family.eos_token, family.pad_token)
        ],
        model_max_length=family.arch["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    if family.added_tokens:
        tokenizer.add_tokens(list(family.added_tokens))
    if family.add_bos and family.bos_token is not None:
        _add_bos_on_encode(tokenizer, family.bos_token)
    tokenizer.chat_template = chat_template(family)
    return tokenizer


def _train_bpe(family: Family) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = tokenizer_corpus()
    if family.tokenizer_style == "byte_level":
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=BPE_VOCAB_SIZE,
            min_frequency=2,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        core.train_from_iterator(corpus, trainer)
        return core

    # SentencePiece style: spaces become "▁" joined to the following word; characters the vocabulary lacks
    # fall back to byte tokens <0x00>..<0xFF>, so every string still round-trips.
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=family.prepend_scheme, split=True)
    draft = Tokenizer(models.BPE(unk_token=family.unk_token))
    draft.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=[chr(c) for c in range(32, 127)] + ["▁"],
        special_tokens=[family.unk_token] if family.unk_token else [],
        show_progress=False,
    )
    draft.train_from_iterator(corpus, trainer)
    trained = json.loads(draft.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [_merge_pair(m) for m in trained["merges"]]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=family.unk_token, byte_fallback=True))
    core.pre_tokenizer = metaspace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if family.prepend_scheme == "first":
        steps.append(decoders.Strip(" ", 1, 0))  # the space the pre-tokenizer prepended
    core.decoder = decoders.Sequence(steps)
    return core


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    # tokenizers serialises a merge as "a b" (older) or ["a", "b"] (newer).
    first, second = merge.split(" ", 1) if isinstance(merge, str) else merge
    return first, second


def _add_bos_on_encode(tokenizer: PreTrainedTokenizerFast, bos: str) -> None:
    from tokenizers import processors

    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )


def build_family_model(
    out_dir: Path, family: str, *, seed: int = SEED, vocab_size: int | None = None, **arch: Any
) -> None:
    """Write config, safetensors weights, generation config and tokenizer for `family` into `out_dir`.

    `arch` overrides the family's sizes (a benchmark builds the real layer sizes); `vocab_size` may exceed the
    tokenizer's, the extra rows are never produced.
    """
    import torch
    import transformers
    from transformers import GenerationConfig

    spec = FAMILIES[family]
    tokenizer = build_family_tokenizer(spec)
    n_tokens = len(tokenizer)
    config = getattr(transformers, spec.config_class)(
        vocab_size=max(vocab_size or _round_up(n_tokens, 64), n_tokens),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **{**spec.arch, **arch},
    )
    with torch.random.fork_rng(devices=[]):  # building never disturbs the caller's random state
        torch.manual_seed(seed)
        model = getattr(transformers, spec.model_class)(config)
        with torch.no_grad():
            _scale_logits(model)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in spec.stop_tokens]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _scale_logits(model: Any) -> None:
    """Multiply the logits by LM_HEAD_SCALE. Through the LM head, unless it is tied to the input embeddings:
    scaling those too would make each token's own embedding drown out what the layers add (Qwen then barely
    learns to use the request); through the final norm's weight instead, where it is a plain scale (not Gemma's
    `1 + weight`, whose head is scaled as it learns fine)."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    weight = getattr(norm, "weight", None)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied and weight is not None and bool((weight == 1).all()):
        weight.mul_(LM_HEAD_SCALE)
    else:
        model.get_output_embeddings().weight.mul_(LM_HEAD_SCALE)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
