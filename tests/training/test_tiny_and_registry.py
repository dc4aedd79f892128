"""The built-in tiny model and the base-model registry."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from app.config import Settings
from app.errors import NotFound
from app.ml.registry import PRETRAINED_DEFAULTS, TINY_DEFAULTS, BaseModelRegistry
from app.ml.tiny import build_tiny_model, ensure_tiny_model


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_tiny_model_builds_to_the_same_bytes_every_time(tiny, tmp_path):
    build_tiny_model(tmp_path / "again")
    assert digests(tmp_path / "again") == digests(tiny.path)
    names = set(digests(tiny.path))
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".py")) for n in names)


def test_tiny_model_loads_through_from_pretrained_as_a_small_llama(tiny, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.name_or_path, use_safetensors=True)
    assert model.config.model_type == "llama"
    assert 3_000_000 <= sum(p.numel() for p in model.parameters()) <= 5_000_000
    assert tokenizer.chat_template and tokenizer.eos_token_id is not None
    text = "any UTF-8: ü 中 🌍"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_concurrent_first_use_builds_once_and_both_callers_get_a_complete_model(tmp_path):
    # spawn, not fork: forking a process that already runs torch threads can deadlock.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = list(pool.map(ensure_tiny_model, [tmp_path, tmp_path]))
    assert paths[0] == paths[1]
    assert json.loads((paths[0] / "config.json").read_text())["model_type"] == "llama"
    leftovers = [p.name for p in paths[0].parent.iterdir() if p != paths[0]]
    assert leftovers == []
    assert ensure_tiny_model(tmp_path) == paths[0]


def test_registry_lists_configured_models_and_resolves_them(tmp_path, tiny):
    local = tmp_path / "local-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    settings = Settings(data_dir=tmp_path, base_models={"mine": str(local), "hub": "org/some-model-1b"})
    registry = BaseModelRegistry(settings)
    families = ["tiny-gemma2", "tiny-llama3", "tiny-mistral", "tiny-phi3", "tiny-qwen2", "tiny-qwen3"]
    assert registry.names() == sorted(["hub", "mine", "tuneserve-tiny", *families])
    mine = registry.resolve("mine")
    assert mine.path == local and mine.context_length == 1024 and mine.defaults.max_seq_length == 1024
    hub = registry.resolve("hub")
    assert hub.name_or_path == "org/some-model-1b" and hub.defaults == PRETRAINED_DEFAULTS
    assert TINY_DEFAULTS.learning_rate > 10 * PRETRAINED_DEFAULTS.learning_rate


def test_unknown_model_is_not_found_and_lists_known_names(tmp_path):
    registry = BaseModelRegistry(Settings(data_dir=tmp_path, base_models={"other": "org/x"}))
    with pytest.raises(NotFound) as info:
        registry.resolve("gpt-9")
    assert info.value.param == "model" and info.value.code == "model_not_found"
    assert "tuneserve-tiny" in info.value.message and "other" in info.value.message
