"""Tool calls as a model's chat template writes them, learned from the template itself.

Training renders an assistant's `tool_calls` with the model's template, so a fine-tuned model emits its calls in
exactly that form; serving must read them back from the same form. Rather than a parser per family, the form is
learned once per tokenizer by rendering a probe call (and a pair of calls) and locating the call objects in the
text (`ToolCallFormat`):

- Llama 3.1:   {"name": "f", "parameters": {...}}
- Qwen 2/3:    <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>
- Mistral:     [TOOL_CALLS] [{"name": "f", "arguments": {...}, "id": "abcdefghi"}]
- tuneserve-tiny: [{"id": "...", "type": "function", "function": {"name": "f", "arguments": {...}}}]

A template that does not render tools or tool calls (Gemma 2's, Phi-3's) has no format, and tools are refused for
its model. The same format yields the JSON schema of one call (`call_schema`), which the serving side turns into a
grammar when a tool call is required.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.ml.chat import ChatTemplateError, _end_of_turn, _render, _stop_strings, _template_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Path = tuple[str, ...]
# Mistral's template accepts only ids of 9 letters and digits; every other template takes any string. The probe's
# id has that shape, and so do the ids the API gives calls (`app/services/tool_calls.py`).
PROBE_ID = "abcdefghi"
_PROBE_NAME = "tuneserve_probe_function"
_PROBE_ARGUMENTS = {"tuneserve_probe_argument": "tuneserve_probe_value"}
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": _PROBE_NAME,
        "description": "probe",
        "parameters": {"type": "object", "properties": {"tuneserve_probe_argument": {"type": "string"}}},
    },
}


@dataclass(frozen=True)
class ToolCallFormat:
    """How one template writes an assistant turn of tool calls: `prefix`, the first call's JSON object, then
    `separator` and the next object for each further call, then `suffix` (the end-of-turn token is not part of
    it). `separator` is None where the template writes one call per turn (Llama 3.1's). `example` is the probe call
    object as the template wrote it: its keys, in order, are what every call object holds; the name sits at
    `name_path`, the arguments object at `arguments_path`, the call id (Mistral) at `id_path`.

    `hidden`: the special tokens among the fixed parts (Mistral's [TOOL_CALLS], Qwen's <tool_call> where the
    tokenizer marks it special). Served text leaves special tokens out, so reading a turn skips them; a grammar
    writes them as tokens."""

    prefix: str
    separator: str | None
    suffix: str
    example: dict[str, Any]
    name_path: Path
    arguments_path: Path
    id_path: Path | None
    hidden: tuple[str, ...] = ()

    def _shown(self, text: str) -> str:
        for token in self.hidden:
            text = text.replace(token, "")
        return text

    def call_schema(self, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """The JSON schema of one call of function `name` with these `parameters`, keys in the template's order."""
        return _schema_of(self.example, (), self, name, parameters)

    def opening(self) -> str:
        """What every tool-call turn starts with, whitespace removed: the prefix and the call object's brace."""
        return _squash(self._shown(self.prefix)) + "{"

    def parse(self, text: str) -> list[tuple[str, dict[str, Any]]] | None:
        """The (name, arguments) of each call when `text` is a whole tool-call turn in this format (whitespace
        around the fixed parts tolerated), else None."""
        pos = _expect(text, 0, self._shown(self.prefix))
        calls: list[tuple[str, dict[str, Any]]] = []
        decoder = json.JSONDecoder()
        while pos is not None:
            pos = _skip_space(text, pos)
            try:
                value, pos = decoder.raw_decode(text, pos)
            except ValueError:
                return None
            name, arguments = _get(value, self.name_path), _get(value, self.arguments_path)
            if not isinstance(name, str) or not isinstance(arguments, dict):
                return None
            calls.append((name, arguments))
            end = _expect(text, pos, self._shown(self.suffix))
            if end is not None and not text[end:].strip():
                return calls
            pos = _expect(text, pos, self._shown(self.separator)) if self.separator is not None else None
        return None


def _squash(text: str) -> str:
    return "".join(text.split())


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _expect(text: str, pos: int, literal: str) -> int | None:
    """The position after `literal` read at `pos`, whitespace on either side not mattering; None if absent."""
    for char in literal:
        if char.isspace():
            continue
        pos = _skip_space(text, pos)
        if pos >= len(text) or text[pos] != char:
            return None
        pos += 1
    return pos


def _get(value: Any, path: Path) -> Any:
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _find(value: Any, target: Any, path: Path = ()) -> Path | None:
    """The path of the first leaf or object equal to `target` inside `value`."""
    if value == target:
        return path
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find(item, target, (*path, key))
            if found is not None:
                return found
    return None


def _schema_of(value: Any, path: Path, form: ToolCallFormat, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    if path == form.name_path:
        return {"const": name}
    if path == form.arguments_path:
        return parameters
    if path == form.id_path:
        return {"type": "string", "pattern": "^[A-Za-z0-9]{9}$"}
    if isinstance(value, dict):
        return {
            "type": "object",
            "properties": {key: _schema_of(item, (*path, key), form, name, parameters) for key, item in value.items()},
            "required": list(value),
            "additionalProperties": False,
        }
    return {"const": value}  # a fixed part of the form, such as "type": "function"


def _probe_call(n: int) -> dict[str, Any]:
    call_id = PROBE_ID if n == 0 else PROBE_ID[:-1] + str(n)
    function = {"name": _PROBE_NAME, "arguments": json.dumps(_PROBE_ARGUMENTS)}
    return {"id": call_id, "type": "function", "function": function}


def _assistant_text(tokenizer: PreTrainedTokenizerBase, calls: int) -> str:
    """The text a tool-call turn of `calls` probe calls adds after the generation prompt, up to its end of turn."""
    user = {"role": "user", "content": "probe"}
    turn = {"role": "assistant", "content": "", "tool_calls": [_probe_call(n) for n in range(calls)]}
    tools = [_PROBE_TOOL]
    prompt = _render([user], tokenizer, tools, add_generation_prompt=True)
    full = _render(_template_messages([user, turn]), tokenizer, tools, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ChatTemplateError("the model's chat template renders a tool-call turn after another prompt")
    text = full[len(prompt) :]
    return text[: _end_of_turn(text, 0, _stop_strings(tokenizer), 1)]


def _call_objects(text: str) -> list[tuple[int, int, dict[str, Any]]]:
    """(start, end, object) of each outermost JSON object in `text` that holds the probe's function name."""
    decoder, found, pos = json.JSONDecoder(), [], 0
    while (start := text.find("{", pos)) >= 0:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            pos = start + 1
            continue
        if isinstance(value, dict) and _find(value, _PROBE_NAME) is not None:
            found.append((start, end, value))
            pos = end
        else:
            pos = start + 1
    return found


def _learn(tokenizer: PreTrainedTokenizerBase) -> ToolCallFormat:
    try:
        one = _assistant_text(tokenizer, 1)
    except ChatTemplateError as exc:
        raise ChatTemplateError(f"the model's chat template cannot write tool calls: {exc}") from None
    stops = _stop_strings(tokenizer)
    for stop in stops:  # the end-of-turn token closes the turn; it is not part of the format
        one = one.removesuffix(stop)
    objects = _call_objects(one)
    if len(objects) != 1:
        raise ChatTemplateError("the model's chat template does not write tool calls as JSON objects")
    start, end, example = objects[0]
    name_path, arguments_path = _find(example, _PROBE_NAME), _find(example, _PROBE_ARGUMENTS)
    if name_path is None or arguments_path is None:
        raise ChatTemplateError("the model's chat template does not write tool call arguments as a JSON object")
    separator = None
    try:
        two = _assistant_text(tokenizer, 2)
        pair = _call_objects(two)
        if len(pair) == 2:
            separator = two[pair[0][1] : pair[1][0]]
    except ChatTemplateError:  # a template that writes one call per turn refuses two
        pass
    fixed = one[:start] + one[end:] + (separator or "")
    return ToolCallFormat(
        prefix=one[:start],
        separator=separator,
        suffix=one[end:],
        example=example,
        name_path=name_path,
        arguments_path=arguments_path,
        id_path=_find(example, PROBE_ID),
        hidden=tuple(token for token in tokenizer.all_special_tokens if token in fixed),
    )


_formats: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, ToolCallFormat | str] = weakref.WeakKeyDictionary()
_formats_lock = threading.Lock()


def tool_call_format(tokenizer: PreTrainedTokenizerBase) -> ToolCallFormat:
    """The tool-call format of the tokenizer's chat template, learned once per tokenizer; ChatTemplateError when
    the template has none."""
    key = tokenizer
    with _formats_lock:
        if key not in _formats:
            try:
                _formats[key] = _learn(tokenizer)
            except ChatTemplateError as exc:
                _formats[key] = str(exc)
        learned = _formats[key]
    if isinstance(learned, str):
        # A fresh error each time: re-raising one cached instance would chain every request's frames (and the
        # request with them) onto its traceback for as long as the tokenizer lives.
        raise ChatTemplateError(learned)
    return learned
