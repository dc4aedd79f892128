"""Fixtures for the training engine: the real tiny model, built once per test session."""

from __future__ import annotations

import os

# Under CPU contention (other test processes on a 2-core machine) OpenMP's default spin-waiting makes torch
# 5-10x slower; passive waiting keeps it near its uncontended speed. Effective only if torch is not yet
# loaded, so `make test` should export it too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from app.config import Settings  # noqa: E402
from app.ml.registry import BaseModelInfo, BaseModelRegistry  # noqa: E402


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
