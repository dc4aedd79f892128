"""Job creation refuses training or validation data whose conversations the base model's chat template cannot
render: a role the template refuses (Gemma 2 raises on system messages) or leaves out, tools it ignores. The
client gets a 400 naming the line and the role at once, instead of a job that fails deep in training.

Conversations are checked once per shape (the sequence of roles, tool calls and tools), so a large file costs
one read and a handful of template renderings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from app.errors import InvalidRequest
from app.jobs.storage_keys import file_key
from app.ml.base_model import load_tokenizer
from app.ml.chat import ChatTemplateError, check_chat_support
from app.ml.registry import BaseModelInfo
from app.storage import LocalStorage
from app.tables import File

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@lru_cache(maxsize=8)
def _tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(name_or_path)


def check_conversations_fit(storage: LocalStorage, base: BaseModelInfo, files: list[tuple[File, str]]) -> None:
    """Raise InvalidRequest (param: the file's) for the first conversation `base`'s template cannot render."""
    chat_files = [(row, param) for row, param in files if row.format == "chat"]
    if not chat_files:
        return
    try:
        tokenizer = _tokenizer(base.name_or_path)
    except (OSError, ValueError):
        return  # a base model that cannot be loaded here fails the job with its own error in the worker
    for row, param in chat_files:
        seen: set[tuple] = set()
        for line_number, example in _examples(storage, row):
            shape = _shape(example)
            if shape in seen:
                continue
            seen.add(shape)
            try:
                check_chat_support(example["messages"], tokenizer, example.get("tools"))
            except ChatTemplateError as exc:
                raise InvalidRequest(
                    f"Line {line_number} of file {row.id} cannot be trained on {base.name}: {exc}",
                    param=param,
                    code="unsupported_conversation",
                ) from None


def _shape(example: dict[str, Any]) -> tuple:
    messages = tuple(
        (m.get("role"), bool(m.get("tool_calls")), isinstance(m.get("content"), str)) for m in example["messages"]
    )
    return messages, bool(example.get("tools"))


def _examples(storage: LocalStorage, row: File) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, example) of a validated JSONL file."""
    with open(storage.local_path(file_key(row.id)), encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, json.loads(line)
