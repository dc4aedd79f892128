"""A model fine-tuned on JSON answers and on tool calls, served back: the constraint leaves an answer that already
conforms unchanged, and with tool_choice "auto" the model's own tool calls come back as `tool_calls`, in the format
training rendered them in."""

from __future__ import annotations

import json
import random

import pytest

from app.ml.synthetic import INTENTS, intent_json_task
from tests.jobs.test_completions_api import sdk
from worker.runner import run_job

pytestmark = pytest.mark.slow
CITIES = ["Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo", "Quito", "Dakar", "Hanoi", "Sofia", "Bern", "Riga"]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
INTENT_SCHEMA = {
    "type": "object",
    "properties": {"intent": {"enum": sorted(INTENTS)}, "priority": {"enum": ["low", "medium", "high"]}},
    "required": ["intent", "priority"],
    "additionalProperties": False,
}


def weather_example(rng: random.Random, city: str) -> dict:
    ask = rng.choice(["weather in {}?", "what is the weather in {}", "is it raining in {}?", "forecast for {} please"])
    call = {"id": "abcdefghi", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}  # fmt: skip
    return {
        "messages": [{"role": "user", "content": ask.format(city)}, {"role": "assistant", "tool_calls": [call]}],
        "tools": [WEATHER_TOOL],
    }


@pytest.fixture
def structured_model(client, ctx) -> tuple[str, list[tuple[str, str]]]:
    """(the fine-tuned model, held-out intent requests with their answers)."""
    rng = random.Random(4)
    intents, held_out = intent_json_task(120, 8, seed=4)
    calls = [weather_example(rng, city) for city in CITIES[:8] for _ in range(5)]
    rows = intents + calls
    rng.shuffle(rows)
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    r = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("s.jsonl", data)})
    assert r.status_code == 200, r.text
    body = {"model": "tuneserve-tiny", "training_file": r.json()["id"], "suffix": "structured",
            "hyperparameters": {"n_epochs": 6, "batch_size": 8}}  # fmt: skip
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    assert run_job(ctx, r.json()["id"]) == "succeeded"
    return client.get(f"/v1/fine_tuning/jobs/{r.json()['id']}").json()["fine_tuned_model"], held_out


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # the database plays no part; training is a minute
def test_a_fine_tuned_model_served_with_schemas_and_tools(client, structured_model):
    """One training run for both checks (it takes most of this test's time)."""
    model, held_out = structured_model
    a_conforming_answer_is_the_same_with_and_without_the_schema(sdk(client), model, held_out)
    auto_tool_choice_returns_the_fine_tuned_models_calls(sdk(client), model)


def a_conforming_answer_is_the_same_with_and_without_the_schema(openai_client, model, held_out):
    schema_format = {"type": "json_schema", "json_schema": {"name": "intent", "schema": INTENT_SCHEMA, "strict": True}}
    conforming = 0
    for text, _ in held_out:
        messages = [{"role": "user", "content": text}]
        free = openai_client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=80)
        constrained = openai_client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=80, response_format=schema_format
        )
        answer = constrained.choices[0].message.content
        assert json.loads(answer).keys() == {"intent", "priority"}
        try:
            free_value = json.loads(free.choices[0].message.content)
        except ValueError:
            continue
        if (
            isinstance(free_value, dict)
            and free_value.get("intent") in INTENTS
            and free_value.keys() == {"intent", "priority"}
        ):
            conforming += 1
            assert answer == free.choices[0].message.content
    assert conforming >= 6  # the model learned the format: the comparison above ran on most prompts


def auto_tool_choice_returns_the_fine_tuned_models_calls(openai_client, model):
    for city in CITIES[8:]:
        messages = [{"role": "user", "content": f"weather in {city}?"}]
        answer = openai_client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=200
        ).choices[0]
        assert answer.finish_reason == "tool_calls", answer.message.content
        (call,) = answer.message.tool_calls
        assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
        stream = openai_client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=200, stream=True
        )
        deltas = [d for chunk in stream for choice in chunk.choices for d in choice.delta.tool_calls or []]
        assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    # The same model without tools answers an intent request in text, and with tool_choice none reads no calls.
    plain = openai_client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "weather in Bern?"}], tools=[WEATHER_TOOL],
        tool_choice="none", temperature=0, max_tokens=200,
    ).choices[0]  # fmt: skip
    assert plain.message.tool_calls is None and plain.finish_reason in {"stop", "length"}
