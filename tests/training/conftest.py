"""Fixtures for the training engine: the real tiny model, built once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.config import Settings
from app.ml.registry import BaseModelInfo, BaseModelRegistry


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> BaseModelInfo:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"))
    return BaseModelRegistry(settings).resolve("tuneserve-tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.name_or_path)


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path
