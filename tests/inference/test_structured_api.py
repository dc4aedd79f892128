"""Structured outputs and tool calls through the openai SDK against the app: JSON schemas always parse and
validate, and every built-in family's tool calls come back in OpenAI's shape, streamed or not, and go back into
the conversation."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.inference.json_schemas import SCHEMAS

pytestmark = pytest.mark.slow
TINY = "tuneserve-tiny"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather of a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
]
TOOL_FAMILIES = [TINY, "tiny-llama3", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]
NO_TOOL_FAMILIES = ["tiny-gemma2", "tiny-phi3"]  # their published templates render no tools


def json_schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("model", [TINY, "tiny-mistral"])
def test_every_schema_answer_parses_and_validates(sdk, model):
    """The schema suite, sent concurrently (so constrained requests share batches), greedy and sampled."""

    def ask(case):
        name, temperature = case
        answer = sdk.chat.completions.create(
            model=model, messages=MESSAGES, response_format=json_schema_format(name), temperature=temperature,
            seed=3, max_tokens=400,
        )  # fmt: skip
        return name, answer.choices[0]

    cases = [(name, t) for name in SCHEMAS for t in (0.0, 1.0)]
    with ThreadPoolExecutor(8) as pool:
        for name, choice in pool.map(ask, cases):
            assert choice.finish_reason == "stop", (name, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_the_sdk_parse_helper_and_json_object(sdk):
    """`chat.completions.parse` sends a strict schema built from a pydantic model and parses the answer with it."""

    class Review(BaseModel):  # bounded, as a random model would otherwise write one string forever
        sentiment: Literal["good", "bad"]
        stars: int = Field(ge=1, le=5)
        title: str = Field(max_length=10)

    parsed = sdk.chat.completions.parse(model=TINY, messages=MESSAGES, response_format=Review, max_tokens=300)
    assert isinstance(parsed.choices[0].message.parsed, Review)
    anything = sdk.chat.completions.create(
        model="tiny-qwen2", messages=MESSAGES, response_format={"type": "json_object"}, max_tokens=300, temperature=0
    )
    # A random model may write a long object; whatever it wrote before max_tokens is a JSON object's beginning.
    text = anything.choices[0].message.content
    assert text.startswith("{")
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_guided_json_on_completions(sdk):
    completion = sdk.completions.create(
        model="tiny-llama3", prompt="A person:", max_tokens=200, temperature=0,
        extra_body={"guided_json": SCHEMAS["person"]},
    )  # fmt: skip
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMAS["person"])


def test_logprobs_under_a_grammar_list_only_allowed_tokens(client):
    """Where the grammar allows fewer tokens than `top_logprobs`, only those are listed, each with a number: their
    probabilities (over what the grammar allowed) add up to one rather than padding the list with -inf."""
    schema = {"type": "object", "properties": {"ok": {"enum": ["yes", "no"]}}, "required": ["ok"]}
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": TINY, "messages": MESSAGES, "max_tokens": 30, "logprobs": True, "top_logprobs": 20,
            "response_format": {"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}},
        },
    )  # fmt: skip
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    narrowed = [step for step in content if len(step["top_logprobs"]) < 20]
    assert narrowed, "the grammar should leave fewer than 20 choices at some step"
    for step in content:
        assert all(isinstance(alt["logprob"], float) for alt in step["top_logprobs"]), step
    for step in narrowed:
        assert sum(math.exp(alt["logprob"]) for alt in step["top_logprobs"]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    "response_format,says",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
            "uniqueItems",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}, "not"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
        ({"type": "xml"}, "type"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_why(client, response_format, says):
    r = client.post(
        "/v1/chat/completions", json={"model": TINY, "messages": MESSAGES, "response_format": response_format}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith("response_format") and says in error["message"], error


def streamed_calls(stream) -> tuple[list[dict], str | None, str]:
    """Tool calls assembled from streamed deltas as SDK users do (by index), the finish reason and the content."""
    calls: dict[int, dict] = {}
    reason, content = None, ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            reason = choice.finish_reason or reason
    return [calls[i] for i in sorted(calls)], reason, content


@pytest.mark.parametrize("model", TOOL_FAMILIES)
def test_forced_tool_calls_round_trip_on_every_family(sdk, model):
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = sdk.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=300
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls[:1]
    assert call.type == "function" and call.function.name == "get_weather" and len(call.id) == 9
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    stream = sdk.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=300, stream=True
    )
    calls, reason, content = streamed_calls(stream)
    assert reason == "tool_calls" and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls
    ]

    required = sdk.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        temperature=1.0, seed=5, max_tokens=300,
    ).choices[0]  # fmt: skip
    # (Parallel calls are allowed by default; a random model then writes calls until max_tokens.)
    assert required.finish_reason == "tool_calls" and len(required.message.tool_calls) == 1
    assert required.message.tool_calls[0].function.name in {"get_weather", "get_time"}

    # The calls and their results go back into the conversation as OpenAI clients send them.
    history = [
        *MESSAGES,
        choice.message.model_dump(exclude_none=True),
        *[{"role": "tool", "tool_call_id": c.id, "content": "sunny, 21 C"} for c in choice.message.tool_calls],
    ]
    follow_up = sdk.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert follow_up.choices[0].finish_reason in {"stop", "length", "tool_calls"}


@pytest.mark.parametrize("model", NO_TOOL_FAMILIES)
def test_tools_on_a_model_whose_template_has_none_are_refused(client, model):
    body = {"model": model, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "tools_not_supported", r.text
    assert client.post("/v1/chat/completions", json={**body, "tool_choice": "none"}).status_code == 200


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        # Arguments are an object: a forced call with a string's schema could never be read back as a call.
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
        ({"messages": [*MESSAGES, {"role": "assistant", "tool_calls": "x"}]}, "messages.1.tool_calls"),
    ],
)
def test_tool_request_errors(client, extra, param):
    body = {"model": TINY, "messages": MESSAGES, "tools": TOOLS, **extra}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_history_the_template_refuses_is_a_400(client):
    """Mistral's template takes back only 9-character call ids; an OpenAI-style id is the client's error."""
    call = {"id": "call_123", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [*MESSAGES, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_123", "content": "sunny"}]  # fmt: skip
    r = client.post("/v1/chat/completions", json={"model": "tiny-mistral", "messages": messages, "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_auto_answers_text_when_the_model_writes_no_call(sdk):
    """With tool_choice auto, a random model's text answer stays text, streamed or not, and tools are rendered."""
    answer = sdk.chat.completions.create(model=TINY, messages=MESSAGES, tools=TOOLS, max_tokens=12, temperature=0)
    choice = answer.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in {"stop", "length"}
    stream = sdk.chat.completions.create(
        model=TINY, messages=MESSAGES, tools=TOOLS, max_tokens=12, temperature=0, stream=True
    )
    calls, reason, content = streamed_calls(stream)
    assert calls == [] and content == choice.message.content and reason == choice.finish_reason
