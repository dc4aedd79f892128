"""The structured-output clients people point at OpenAI-compatible servers, unmodified, against the app: instructor
(TOOLS, TOOLS_STRICT and JSON_SCHEMA modes) and LangChain (`with_structured_output` by function calling and by JSON
schema, `bind_tools` with a forced choice, streamed). The base models' weights are random, so only the grammar makes
their answers fit: a client getting a valid object back is the constraint working, not the model.

instructor's JSON mode (`json_object` plus the schema in a system prompt) is enforced as JSON only; whether the object
fits the schema is up to the model following that prompt, which these random models cannot."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import instructor
import pytest
from fastapi.testclient import TestClient
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

pytestmark = pytest.mark.slow
PROMPT = "Paris is sunny today. Report the weather."


class Weather(BaseModel):
    """The weather in a city."""

    # A random model would otherwise write one string forever or add keys: bounded and closed, as users' often are.
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=10, description="The city")
    unit: Literal["celsius", "fahrenheit"]
    sunny: bool


@pytest.mark.parametrize("model", ["tuneserve-tiny", "tiny-qwen2", "tiny-mistral"])
@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.TOOLS_STRICT, instructor.Mode.JSON_SCHEMA])
def test_instructor_gets_its_object_on_the_first_try(sdk, model, mode):
    patched = instructor.from_openai(sdk, mode=mode)
    weather, completion = patched.chat.completions.create_with_completion(
        model=model, response_model=Weather, messages=[{"role": "user", "content": PROMPT}], max_tokens=200,
        max_retries=0,
    )  # fmt: skip
    assert isinstance(weather, Weather)
    if mode == instructor.Mode.JSON_SCHEMA:
        assert completion.choices[0].finish_reason == "stop" and not completion.choices[0].message.tool_calls
    else:
        assert completion.choices[0].finish_reason == "tool_calls"


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=10)
    country: Literal["FR", "NO", "IT"]


class Person(BaseModel):
    """A nested model: pydantic writes Address under $defs and refers to it, twice."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=10)
    home: Address
    work: Address | None


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_instructor_with_a_nested_model(sdk, mode):
    patched = instructor.from_openai(sdk, mode=mode)
    person = patched.chat.completions.create(
        model="tiny-qwen2", response_model=Person, messages=[{"role": "user", "content": "Ana lives in Oslo."}],
        max_tokens=300, max_retries=0,
    )  # fmt: skip
    assert isinstance(person.home, Address)


@pytest.fixture(scope="module")
def chat_model(client: TestClient) -> Iterator[ChatOpenAI]:
    key = client.headers["Authorization"].removeprefix("Bearer ")
    yield ChatOpenAI(
        model="tiny-llama3", base_url=f"{client.base_url}/v1", api_key=key, http_client=client, max_retries=0,
        max_completion_tokens=200, temperature=0,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output(chat_model, method):
    structured = chat_model.with_structured_output(Weather, method=method, include_raw=True)
    result = structured.invoke(PROMPT)
    assert result["parsing_error"] is None, result["raw"]
    assert isinstance(result["parsed"], Weather)


def test_langchain_bind_tools_forced_and_streamed(chat_model):
    forced = chat_model.bind_tools([Weather], tool_choice="Weather", parallel_tool_calls=False)
    message = forced.invoke(PROMPT)
    (call,) = message.tool_calls
    assert call["name"] == "Weather" and call["id"]
    Weather.model_validate(call["args"])

    # Streamed chunks add up, as LangChain adds them, to the same call.
    total: AIMessageChunk | None = None
    for chunk in forced.stream(PROMPT):
        assert isinstance(chunk, AIMessageChunk)
        total = chunk if total is None else total + chunk
    assert total is not None
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [(call["name"], call["args"])]

    # The call's result goes back and the model answers.
    result = ToolMessage("sunny, 21 C", tool_call_id=call["id"])
    follow_up = chat_model.bind_tools([Weather]).invoke([HumanMessage(PROMPT), message, result])
    assert follow_up.response_metadata["finish_reason"] in {"stop", "length", "tool_calls"}
