"""Serving end to end: two adapters trained by a real worker on two different tasks, then asked concurrently
(streaming and not) through the openai SDK over uvicorn, Postgres and Redis. Each answers in the format it
learned; the base model in neither."""

from __future__ import annotations

import asyncio
import io
import json

import openai
import pytest

from app.ml.synthetic import intent_json_task
from tests.e2e.conftest import wait_terminal
from tests.e2e.server import LiveServer

pytestmark = pytest.mark.slow

JSON_STYLE = '{"intent":'
TAG_STYLE = "[["


def training_file(style: str) -> bytes:
    examples, _ = intent_json_task(160, 20, seed=3)
    for example in examples:
        answer = example["messages"][-1]
        if style == "tags":  # the same requests, answered in another format
            answer["content"] = f"[[{json.loads(answer['content'])['intent']}]]"
    return b"".join(json.dumps(e).encode() + b"\n" for e in examples)


def train_adapter(sdk: openai.OpenAI, style: str) -> str:
    file = sdk.files.create(file=(f"{style}.jsonl", io.BytesIO(training_file(style))), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model="tuneserve-tiny", training_file=file.id, suffix=style, hyperparameters={"n_epochs": 4, "batch_size": 8}
    )
    return job.id


async def ask(client: openai.AsyncOpenAI, model: str, question: str, stream: bool) -> str:
    messages = [{"role": "user", "content": question}]
    if not stream:
        reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
        return reply.choices[0].message.content
    parts = []
    async for chunk in await client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


def test_two_adapters_each_answer_in_their_own_format(pg_stack):
    stack = pg_stack
    with LiveServer(stack.env, stack.tmp / "api.log") as server:
        sdk = stack.sdk(server)
        with stack.worker():
            jobs = {style: train_adapter(sdk, style) for style in ("json", "tags")}
            models = {}
            for style, job_id in jobs.items():
                done = wait_terminal(sdk, job_id, timeout=300)
                assert done.status == "succeeded", done.error
                models[style] = done.fine_tuned_model

        _, held_out = intent_json_task(160, 20, seed=3)
        questions = [q for q, _ in held_out[:6]]
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=sdk.api_key, max_retries=0)

        async def everything():
            calls = [
                ask(client, model, q, stream=i % 2 == 0)
                for model in (models["json"], models["tags"], "tuneserve-tiny")
                for i, q in enumerate(questions)
            ]
            return await asyncio.gather(*calls)

        answers = asyncio.run(everything())
        json_answers, tag_answers, base_answers = answers[:6], answers[6:12], answers[12:]
        assert all(a.startswith(JSON_STYLE) for a in json_answers), json_answers
        assert all(a.startswith(TAG_STYLE) and a.endswith("]]") for a in tag_answers), tag_answers
        assert not any(a.startswith((JSON_STYLE, TAG_STYLE)) for a in base_answers), base_answers

        # Completions over a fine-tuned model work too, and the usage adds up.
        completion = sdk.completions.create(model=models["tags"], prompt="hello", max_tokens=5, temperature=0)
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
        assert completion.choices[0].finish_reason in ("stop", "length")
