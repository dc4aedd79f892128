"""Validated JSONL -> tokenized examples with shifted targets, under an explicit long-example policy.

Targets are shifted here, per example (`targets[i]` is the label of `input_ids[i + 1]`, the last is -100),
so that once examples are packed side by side no position ever predicts the first token of its neighbour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from app.errors import InvalidRequest
from app.ml.chat import IGNORE_INDEX, ChatTemplateError, render_training_example
from worker.training.errors import TrainingError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from worker.training.preference import PreferencePair


@dataclass
class TokenizedExample:
    input_ids: list[int]
    targets: list[int]
    n_supervised: int
    line: int = 0  # in the uploaded file (1-based), for reports a user can act on; 0 when not from a file

    def __len__(self) -> int:
        return len(self.input_ids)


Item = TypeVar("Item", bound="TokenizedExample | PreferencePair")


@dataclass
class TokenizedDataset(Generic[Item]):
    """Examples (or preference pairs) that will be trained on, and the counts of those that will not (never
    silently)."""

    examples: list[Item] = field(default_factory=list)
    n_read: int = 0
    n_dropped_too_long: int = 0
    n_truncated: int = 0
    n_dropped_no_supervised: int = 0

    @property
    def n_tokens(self) -> int:
        return sum(len(e) for e in self.examples)

    @property
    def n_supervised(self) -> int:
        return sum(e.n_supervised for e in self.examples)

    def count(self, *outcomes: Tokenized) -> bool:
        """Count what became of one item's examples (one, or a pair's two); whether all of them are usable. An item
        is dropped for the first reason any of its examples has."""
        self.n_truncated += any(o.truncated for o in outcomes)
        dropped = next((o.dropped for o in outcomes if o.dropped), None)
        if dropped == "too_long":
            self.n_dropped_too_long += 1
        elif dropped == "no_supervised":
            self.n_dropped_no_supervised += 1
        return dropped is None

    def counts(self) -> dict[str, int]:
        return {
            "n_examples_read": self.n_read,
            "n_examples_used": len(self.examples),
            "n_dropped_too_long": self.n_dropped_too_long,
            "n_truncated": self.n_truncated,
            "n_dropped_no_supervised": self.n_dropped_no_supervised,
        }


def read_jsonl(
    path: Path, *, param: str = "training_file", preference: bool | None = False
) -> list[tuple[int, dict[str, Any]]]:
    """Read an already validated JSONL file: (line number, example) pairs, blank lines skipped. Its examples must
    be preference pairs when `preference` (DPO), chat or prompt/completion examples when False, either when None."""
    examples: list[tuple[int, dict[str, Any]]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                examples.append((number, json.loads(line)))
    if preference is not None and examples and ("preferred_output" in examples[0][1]) != preference:
        wanted = "preference examples (method dpo)" if preference else "chat or prompt/completion examples"
        raise InvalidRequest(f"this method trains on {wanted}", param=param, code="invalid_file_format")
    return examples


@dataclass
class Tokenized:
    """What became of one example: the example, or the reason it is dropped; and whether it was truncated."""

    example: TokenizedExample | None
    dropped: str | None  # "too_long" | "no_supervised"
    truncated: bool = False


def shift_labels(input_ids: list[int], labels: list[int], line: int = 0) -> TokenizedExample:
    targets = list(labels[1:]) + [IGNORE_INDEX]
    return TokenizedExample(list(input_ids), targets, sum(t != IGNORE_INDEX for t in targets), line)


def _truncate_left(
    input_ids: list[int], labels: list[int], max_len: int, bos_id: int | None
) -> tuple[list[int], list[int]]:
    """Keep the last `max_len` tokens (the answer side); keep a leading BOS so the model sees a normal start."""
    if bos_id is not None and input_ids and input_ids[0] == bos_id:
        keep = max_len - 1
        return [bos_id] + input_ids[-keep:], [IGNORE_INDEX] + labels[-keep:]
    return input_ids[-max_len:], labels[-max_len:]


def tokenize_examples(
    raw: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    policy: str = "drop",
    lines: list[int] | None = None,
) -> TokenizedDataset[TokenizedExample]:
    """Render every example; apply `policy` ("drop" or "truncate_left") to examples over `max_seq_length`;
    drop (and count) examples left with no supervised token. `lines` are the examples' line numbers in their
    file, kept on each example."""
    out: TokenizedDataset[TokenizedExample] = TokenizedDataset(n_read=len(raw))
    for line, example in zip(lines or [0] * len(raw), raw, strict=True):
        tokenized = tokenize_example(example, tokenizer, max_seq_length, policy, line)
        if out.count(tokenized) and tokenized.example is not None:
            out.examples.append(tokenized.example)
    return out


def tokenize_example(
    example: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_seq_length: int, policy: str, line: int
) -> Tokenized:
    """One example rendered and shifted (`truncated` says whether `policy` cut it to fit), or why it is not
    used: "too_long" or "no_supervised"."""
    input_ids, labels = render_example(example, tokenizer)
    return fit_example(input_ids, labels, max_seq_length, policy, tokenizer.bos_token_id, line)


def render_example(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a chat or prompt/completion example; a template that refuses it is a TrainingError."""
    try:
        return render_training_example(example, tokenizer)
    except ChatTemplateError as exc:
        raise TrainingError("invalid_chat_template", str(exc)) from None


def fit_example(
    input_ids: list[int], labels: list[int], max_len: int, policy: str, bos_id: int | None, line: int
) -> Tokenized:
    """A rendered example under `policy` when it is over `max_len` tokens, shifted."""
    truncated = False
    if len(input_ids) > max_len:
        if policy != "truncate_left":
            return Tokenized(None, "too_long")
        input_ids, labels = _truncate_left(input_ids, labels, max_len, bos_id)
        truncated = True
    tokenized = shift_labels(input_ids, labels, line)
    if tokenized.n_supervised == 0:
        return Tokenized(None, "no_supervised", truncated)
    return Tokenized(tokenized, None, truncated)


def load_dataset(
    path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_length: int, policy: str, *, param: str
) -> TokenizedDataset[TokenizedExample]:
    numbered = read_jsonl(path, param=param)
    lines, raw = [n for n, _ in numbered], [example for _, example in numbered]
    return tokenize_examples(raw, tokenizer, max_seq_length, policy, lines)
