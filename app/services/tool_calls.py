"""Tools on chat completions: checking `tools` and `tool_choice`, the grammar that makes the model call a tool when
it must, and the calls read back from what the model wrote.

The model writes calls in its template's format (`app/ml/tool_calls.py`), the one training rendered its examples
in. `tool_choice` "auto" lets it choose between text and calls; "required" and a named function are enforced with
a grammar of that format, so the answer is always a call; "none" renders the tools and reads no calls.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.errors import InvalidRequest
from app.inference import Constraint
from app.inference.grammar import lark_constraint, lark_json
from app.ml.chat import ChatTemplateError
from app.ml.tool_calls import ToolCallFormat, tool_call_format
from app.schemas.completions import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolUse:
    """How one request's answers are read for tool calls: in `form`, of the functions in `parameters`; `forced`
    when the grammar makes every answer a call."""

    form: ToolCallFormat
    parameters: dict[str, dict[str, Any]]  # function name -> its parameters' JSON schema
    forced: bool

    def read_calls(self, text: str) -> list[ToolCall] | None:
        """The calls an answer makes, or None when it is text (or calls no declared function)."""
        parsed = self.form.parse(text)
        if not parsed or any(name not in self.parameters for name, _ in parsed):
            return None
        return [
            ToolCall(id=call_id(), function=FunctionCall(name=name, arguments=json.dumps(arguments)))
            for name, arguments in parsed
        ]


def call_id() -> str:
    """A call's id: 9 letters and digits, the one shape every template accepts back (Mistral's checks it)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema of each tool; a tool that is not a function definition is a 400 naming it."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidRequest(
                'Each tool must be {"type": "function", "function": {...}}.', param=f"tools[{i}]", code="invalid_tool"
            )
        name, parameters = function.get("name"), function.get("parameters", {"type": "object"})
        if not isinstance(name, str) or not name or len(name) > 64:
            raise InvalidRequest(
                "A function needs a name of 1 to 64 characters.", param=f"tools[{i}].function.name", code="invalid_tool"
            )
        # Arguments are a JSON object (the call's `arguments` string decodes to one), so the schema must be an
        # object's; one that names no type (`{}`: no parameters) is read as an object's.
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise InvalidRequest(
                "A function's parameters are a JSON schema of an object.",
                param=f"tools[{i}].function.parameters",
                code="invalid_tool",
            )
        parameters = {"type": "object", **parameters}
        if name in functions:
            raise InvalidRequest(
                f"Two tools are named '{name}'.", param=f"tools[{i}].function.name", code="invalid_tool"
            )
        functions[name] = parameters
    return functions


def prepare_tools(
    request: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase
) -> tuple[ToolUse | None, Constraint | None]:
    """How to read this request's answers for calls, and the grammar that forces one when `tool_choice` asks."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools.", param="tool_choice")
        return None, None
    functions = _functions(request.tools)
    if choice == "none":
        return None, None
    try:
        form = tool_call_format(tokenizer)
    except ChatTemplateError as exc:
        raise InvalidRequest(
            f"This model does not support tools: {exc}.", param="tools", code="tools_not_supported"
        ) from None
    if choice is None or choice == "auto":
        return ToolUse(form, functions, forced=False), None
    if isinstance(choice, NamedToolChoice):  # one call of that function
        if choice.function.name not in functions:
            raise InvalidRequest(
                f"tool_choice names '{choice.function.name}', which is not among the tools.", param="tool_choice"
            )
        functions_called, parallel = {choice.function.name: functions[choice.function.name]}, False
    else:  # "required": one call or more (unless parallel_tool_calls is false) of any of the tools
        functions_called, parallel = functions, request.parallel_tool_calls is not False
    grammar = forced_call_grammar(form, functions_called, _added_tokens(tokenizer), parallel=parallel)
    return ToolUse(form, functions, forced=True), lark_constraint(grammar, param="tool_choice")


def forced_call_grammar(
    form: ToolCallFormat, functions: dict[str, dict[str, Any]], added_tokens: dict[str, int], *, parallel: bool
) -> str:
    """A Lark grammar (llguidance's dialect) of a turn of one call, or several where `parallel`, to `functions`
    with valid arguments, in `form`. `added_tokens` (text -> id) are written as the tokens themselves."""
    schemas: list[dict[str, Any]] = []
    definitions: dict[str, Any] = {}
    for i, (name, parameters) in enumerate(functions.items()):
        # The parameters sit inside the call's schema, so their local definitions ("#/$defs/X", as pydantic writes
        # nested models) move to the root, named per function so that two functions' definitions cannot clash.
        prefix = f"f{i}_"
        parameters = _with_root_refs(parameters, prefix)
        for key in ("$defs", "definitions"):
            definitions |= {prefix + def_name: schema for def_name, schema in parameters.pop(key, {}).items()}
        schemas.append(form.call_schema(name, parameters))
    call = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if definitions:
        call = {**call, "$defs": definitions}
    repeat = ""
    if parallel and form.separator is not None:  # a template without a separator writes one call per turn
        repeat = f" ({_literal(form.separator, added_tokens)} call)*"
    parts = [_literal(form.prefix, added_tokens), "call" + repeat, _literal(form.suffix, added_tokens)]
    return "\n".join(["start: " + " ".join(part for part in parts if part), f"call: {lark_json(call)}"])


def _with_root_refs(schema: Any, prefix: str) -> Any:
    """A copy of `schema` whose local references point at root definitions named `prefix` + their name."""
    if isinstance(schema, list):
        return [_with_root_refs(item, prefix) for item in schema]
    if not isinstance(schema, dict):
        return schema
    copy = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str):
            for local in ("#/$defs/", "#/definitions/"):
                if value.startswith(local):
                    value = f"#/$defs/{prefix}{value.removeprefix(local)}"
            copy[key] = value
        else:
            copy[key] = _with_root_refs(value, prefix)
    return copy


def _added_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    return {token.content: int(i) for i, token in tokenizer.added_tokens_decoder.items()}


def _literal(text: str | None, added_tokens: dict[str, int]) -> str:
    """`text` as a Lark sequence: its added tokens (Qwen's <tool_call>, Mistral's [TOOL_CALLS]) as token ids, which
    the grammar engine keeps apart from text, and the rest as strings (a JSON string is a Lark string literal with
    the same escapes)."""
    if not text:
        return ""
    found = sorted(
        ((text.find(token), token) for token in added_tokens if token and token in text), key=lambda hit: hit[0]
    )
    for start, token in found:
        before, after = text[:start], text[start + len(token) :]
        parts = [_literal(before, added_tokens), f"<[{added_tokens[token]}]>", _literal(after, added_tokens)]
        return " ".join(part for part in parts if part)
    return json.dumps(text)
