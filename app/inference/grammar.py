"""Constrained decoding: a grammar decides which tokens may come next, row by row inside the mixed batch.

The grammar engine is llguidance. Against xgrammar, on this project's family tokenizers and the JSON schema suite of
`tests.inference.json_schemas.py`, both computed a batch's masks in about 0.1-0.2 ms a step; llguidance refused the
keywords it cannot enforce (`uniqueItems`, `not`) by name where xgrammar compiled them away silently, and xgrammar
let a raw control character into a JSON string on Mistral's tokenizer, an output that did not parse.

A request carries its grammar as text (`Constraint`); the engine checks it against the base model's tokenizer when
the request is submitted (an unsupported schema is a 400 naming the keyword), and each sequence gets its own matcher,
a copy of the grammar compiled once per base model.
Before a step samples, every constrained row's logits outside its grammar are set to -inf; the end-of-turn ids are
allowed only where the grammar is complete. Free rows are untouched.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, cast

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from app.errors import InvalidRequest
from app.inference.types import Constraint

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions
    from transformers import PreTrainedTokenizerBase, TokenizersBackend

# At most one space between JSON tokens: compact JSON ({"a":1}) as training files often hold it, and JSON as
# `json.dumps` and templates' `tojson` write it ({"a": 1, "b": [2, 3]}) both pass, so a constrained answer can be
# the one the model learned; free whitespace would let a model write newlines without end.
_JSON_LAYOUT: JsonCompileOptions = {"whitespace_pattern": "[ ]?"}
# Distinct grammars kept compiled per base model; the least recently used is dropped beyond this.
_COMPILED_GRAMMARS = 64


def json_schema_constraint(schema: dict[str, Any], param: str) -> Constraint:
    """Output that is one JSON value valid against `schema`."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_JSON_LAYOUT)
    return Constraint(grammar=grammar, param=param)


def lark_json(schema: dict[str, Any]) -> str:
    """A Lark item for one JSON value valid against `schema`, laid out as `json_schema_constraint` lays it out."""
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_LAYOUT})


def lark_constraint(lark: str, param: str) -> Constraint:
    """Output matching a Lark grammar, in llguidance's dialect (`%json{...}` embeds a JSON schema)."""
    return Constraint(grammar=llguidance.LLMatcher.grammar_from_lark(lark), param=param)


class GrammarTokenizer:
    """One base model's tokenizer as the grammar engine reads it, built on first use (a large vocabulary takes a
    moment) and shared by every matcher of that model. `vocab_size` is the width of the model's logits."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_ids = stop_ids
        self._built: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        # Matchers in their start state by grammar text, copied for each sequence: compiling takes about 0.5 ms, a
        # copy about 2 us, and clients send the same schema again and again (the service checks it, then each of
        # a request's `n` sequences needs its own matcher).
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    def _engine_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._built is None:
                try:
                    self._built = llguidance.hf.from_tokenizer(
                        cast("TokenizersBackend", self._tokenizer), n_vocab=self.vocab_size, eos_token=self._stop_ids
                    )
                except (TypeError, ValueError, AttributeError) as exc:  # a slow (Python) tokenizer
                    raise InvalidRequest(
                        f"Constrained output is not available for this model's tokenizer: {exc}",
                        code="unsupported_model",
                    ) from None
            return self._built

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence; a grammar the engine cannot enforce is a 400 naming why."""
        with self._lock:
            compiled = self._compiled.get(constraint.grammar)
            if compiled is not None:
                self._compiled.move_to_end(constraint.grammar)
        if compiled is None:
            compiled = llguidance.LLMatcher(self._engine_tokenizer(), constraint.grammar, log_level=0)
            if compiled.is_error():
                raise InvalidRequest(
                    f"This schema or grammar cannot be enforced: {compiled.get_error()}",
                    param=constraint.param,
                    code="unsupported_schema",
                )
            with self._lock:
                self._compiled[constraint.grammar] = compiled
                while len(self._compiled) > _COMPILED_GRAMMARS:
                    self._compiled.popitem(last=False)
        return compiled.deep_copy()


def mask_disallowed(logits: torch.Tensor, constrained: list[tuple[int, llguidance.LLMatcher]]) -> None:
    """Set to -inf, in place, the logits [rows, vocab] of tokens each (row, matcher) does not allow next."""
    if not constrained:
        return
    rows, vocab = len(constrained), logits.shape[-1]
    bitmask = llguidance.torch.allocate_token_bitmask(rows, vocab)
    for slot, (_, matcher) in enumerate(constrained):
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, slot)
    # Bit j of word w allows token 32*w + j. Unpacked here rather than with llguidance's kernel, which compiles
    # itself with torch.compile on first use (seconds).
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, :vocab].bool().to(logits.device)
    index = torch.tensor([row for row, _ in constrained], device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
