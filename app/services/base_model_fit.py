"""What job creation checks against the base model itself, so that a job that cannot work is a 400 now rather
than a failure deep in training or an adapter that cannot be served:
- conversations its chat template cannot render: a role the template refuses (Gemma 2 raises on system
  messages) or leaves out, tools it ignores; named by line and role. Checked once per shape (the sequence of
  roles, tool calls and tools), so a large file costs one read and a handful of template renderings;
- LoRA `target_modules` that name no linear layer of the architecture (Phi-3 has `qkv_proj`, not `q_proj`);
- a LoRA rank above what the inference engine serves.
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
from app.ml.modules import linear_module_names, short_names, unmatched_targets
from app.ml.registry import BaseModelInfo
from app.storage import Storage
from app.tables import File

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# Distinct conversation shapes rendered per file at job creation: rendering is quadratic in a conversation's
# turns, so the check is bounded; what it does not reach, the worker still refuses by line.
MAX_SHAPES_CHECKED = 32


@lru_cache(maxsize=8)
def _tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(name_or_path)


def check_conversations_fit(storage: Storage, base: BaseModelInfo, files: list[tuple[File, str]]) -> None:
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
        for line_number, example in _examples(storage, row, param):
            shape = _shape(example)
            if shape in seen:
                continue
            if len(seen) >= MAX_SHAPES_CHECKED:
                break  # bounded work per request; the worker checks every example and fails the job by line
            seen.add(shape)
            try:
                check_chat_support(example["messages"], tokenizer, example.get("tools"))
            except ChatTemplateError as exc:
                raise InvalidRequest(
                    f"Line {line_number} of file {row.id} cannot be trained on {base.name}: {exc}",
                    param=param,
                    code="unsupported_conversation",
                ) from None


def check_lora_fits(base: BaseModelInfo, target_modules: str | list[str], lora_r: int, max_rank: int) -> None:
    if lora_r > max_rank:
        raise InvalidRequest(
            f"lora_r {lora_r} exceeds {max_rank}, the largest rank the inference engine serves.",
            param="hyperparameters.lora_r",
            code="invalid_hyperparameters",
        )
    if target_modules == "all-linear":
        return
    try:
        modules = linear_module_names(base.name_or_path)
    except (OSError, ValueError):
        return  # a base model that cannot be loaded here fails the job with its own error in the worker
    unmatched = unmatched_targets(list(target_modules), modules)
    if unmatched:
        raise InvalidRequest(
            f"target_modules {unmatched} name no linear layer of {base.name}; its layers are "
            f'{", ".join(short_names(modules))}, or use "all-linear".',
            param="hyperparameters.target_modules",
            code="invalid_hyperparameters",
        )


def _shape(example: dict[str, Any]) -> tuple:
    """What a template's acceptance can depend on, short of every value: roles in order, whether text is there,
    how many tool calls and the length of their ids (Mistral's template refuses ids not 9 characters long,
    Llama 3's more than one call per message), and whether tools are given."""
    messages = tuple(
        (
            m.get("role"),
            isinstance(m.get("content"), str) and bool(m.get("content")),
            tuple(len(str(call.get("id", ""))) for call in m.get("tool_calls") or [] if isinstance(call, dict)),
            len(str(m.get("tool_call_id", ""))),
        )
        for m in example["messages"]
    )
    return messages, bool(example.get("tools"))


def _examples(storage: Storage, row: File, param: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, example) of a validated JSONL file."""
    # Streamed, not fetched whole: with object storage the API has no use for a local copy of training data.
    chunks = storage.iter_chunks(file_key(row.id))
    try:
        for number, line in enumerate(_lines(chunks), start=1):
            if line.strip():
                yield number, json.loads(line)
    except FileNotFoundError:  # deleted meanwhile (SQLite takes no row lock to stop that)
        raise InvalidRequest(f"File {row.id} does not exist.", param=param, code="file_not_found") from None


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
    if rest:
        yield rest
