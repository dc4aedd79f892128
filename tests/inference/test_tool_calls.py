"""Tool-call formats learned from each family's template: what training teaches a model to write is what the
forced-call grammar allows and what serving reads back; and how a streamed answer becomes calls or text."""

from __future__ import annotations

import json

import pytest

from app.inference import Finished, TextDelta
from app.inference.grammar import GrammarTokenizer, lark_constraint
from app.ml.chat import ChatTemplateError, end_of_turn_ids, render_chat_example
from app.ml.tool_calls import tool_call_format
from app.schemas.completions import ChatCompletionRequest
from app.services.completion_responses import ChatCompletionResponses
from app.services.completions import Prepared
from app.services.tool_calls import ToolUse, _added_tokens, forced_call_grammar
from tests.inference.families import FAMILIES

pytestmark = pytest.mark.slow
PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}}]
TEMPLATE_WITHOUT_TOOLS = {"gemma2", "phi3"}


def tokenizer_of(registry, model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(registry.resolve(model).name_or_path)


def call(call_id: str, city: str) -> dict:
    arguments = json.dumps({"city": city})
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in TEMPLATE_WITHOUT_TOOLS] + ["tiny"])
def test_trained_tool_calls_are_what_the_grammar_allows_and_serving_reads(registry, family):
    """A training example's supervised tool-call tokens (two calls where the template writes several) pass the
    forced-call grammar token by token, end where it is complete, and read back as the same calls."""
    tokenizer = tokenizer_of(registry, "tuneserve-tiny" if family == "tiny" else f"tiny-{family}")
    form = tool_call_format(tokenizer)
    calls = [call("abcdefghi", "Paris")] + ([call("abcdefgh1", "Rome")] if form.separator is not None else [])
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": calls}]
    ids, labels = render_chat_example(messages, tokenizer, TOOLS)
    stops = end_of_turn_ids(tokenizer)
    supervised = [token for token, label in zip(ids, labels, strict=True) if label != -100 and token not in stops]

    grammar = forced_call_grammar(form, {"get_weather": PARAMETERS}, _added_tokens(tokenizer), parallel=True)
    matcher = GrammarTokenizer(tokenizer, len(tokenizer), sorted(stops)).matcher(lark_constraint(grammar, "tools"))
    assert all(matcher.consume_token(token) for token in supervised), matcher.get_error()
    assert matcher.is_accepting()

    served = tokenizer.decode(supervised, skip_special_tokens=True)  # as the engine's detokenizer writes it
    assert form.parse(served) == [("get_weather", {"city": c}) for c in ("Paris", "Rome")[: len(calls)]]


@pytest.mark.parametrize("family", sorted(TEMPLATE_WITHOUT_TOOLS))
def test_a_template_without_tools_has_no_format(registry, family):
    tokenizer = tokenizer_of(registry, f"tiny-{family}")
    with pytest.raises(ChatTemplateError) as first:
        tool_call_format(tokenizer)
    with pytest.raises(ChatTemplateError) as second:  # the cached refusal
        tool_call_format(tokenizer)
    # Each refusal is its own error: one cached instance re-raised would keep every request's frames alive.
    assert first.value is not second.value and len(second.traceback) == len(first.traceback)


def stream(registry, pieces: list[str], reason: str = "stop") -> list[dict]:
    """The chunks (as dicts) a streamed auto-mode answer made of `pieces` of text becomes, on the tiny model."""
    tokenizer = tokenizer_of(registry, "tuneserve-tiny")
    use = ToolUse(tool_call_format(tokenizer), {"get_weather": PARAMETERS}, forced=False)
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    responses = ChatCompletionResponses(request, Prepared([], 1, [], tokenizer, tool_use=use))
    chunks = [responses.opening_chunk(0)]
    for piece in pieces:
        chunks += responses.event_chunks(0, TextDelta(piece))
    chunks += responses.event_chunks(0, Finished(reason, 1, len(pieces)))
    return [chunk.model_dump(mode="json")["choices"][0] for chunk in chunks]


def test_a_streamed_call_is_held_back_and_sent_as_tool_calls(registry):
    text = json.dumps(
        [{"id": "x", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    )
    choices = stream(registry, [text[i : i + 5] for i in range(0, len(text), 5)])
    deltas = [c["delta"] for c in choices[1:]]
    assert all("content" not in d for d in deltas)  # nothing of the call leaks out as text
    opening, arguments = deltas[0]["tool_calls"][0], deltas[1]["tool_calls"][0]
    assert opening["function"] == {"name": "get_weather", "arguments": ""} and opening["type"] == "function"
    assert json.loads(arguments["function"]["arguments"]) == {"city": "Oslo"} and "id" not in arguments
    assert choices[-1]["finish_reason"] == "tool_calls"


def test_text_streams_as_soon_as_it_cannot_be_a_call(registry):
    choices = stream(registry, [" [", "no", " call here", " at all"], reason="length")
    contents = [c["delta"].get("content") for c in choices]
    assert contents == ["", " [no", " call here", " at all", None]
    assert choices[-1]["finish_reason"] == "length"


def test_a_call_to_an_undeclared_function_or_a_cut_call_is_text(registry):
    other = json.dumps([{"id": "x", "type": "function", "function": {"name": "rm_rf", "arguments": {}}}])
    assert "".join(c["delta"].get("content") or "" for c in stream(registry, [other])) == other
    cut = '[{"id": "x", "type": "function", "function": {"name": "get_weather", "argu'
    choices = stream(registry, [cut], reason="length")
    assert choices[-2]["delta"]["content"] == cut and choices[-1]["finish_reason"] == "length"
