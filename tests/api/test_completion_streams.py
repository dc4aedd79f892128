"""The bytes of completion streams, pinned: the openai SDK parses exactly these shapes (`usage` null on every
chunk but the last when asked for, absent otherwise; the chat role once at the start; the error envelope when
generation fails after the 200 went out)."""

from __future__ import annotations

import asyncio

from app.api.generation import stream_chunks
from app.errors import InvalidRequest
from app.inference import Finished, GenerationHandle, TextDelta
from app.schemas.completions import ChatCompletionRequest, CompletionRequest
from app.services.completion_responses import ChatCompletionResponses, CompletionResponses
from app.services.completions import Prepared

HI = [{"role": "user", "content": "hi"}]


def stream(responses, events: list) -> list[str]:
    responses.id, responses.created = "id-1", 1700000000
    handle = GenerationHandle()
    for event in events:
        handle.push(event)

    async def collect() -> list[str]:
        return [part async for part in stream_chunks([handle], responses)]

    return asyncio.run(collect())


def completion(**options) -> CompletionResponses:
    request = CompletionRequest(model="m", prompt="hi", stream=True, **options)
    return CompletionResponses(request, Prepared(requests=[], prompt_tokens=2, prompt_texts=["hi"], tokenizer=None))


def chat(**options) -> ChatCompletionResponses:
    request = ChatCompletionRequest(model="m", messages=HI, stream=True, **options)
    return ChatCompletionResponses(request, Prepared(requests=[], prompt_tokens=7, prompt_texts=[], tokenizer=None))


def line(payload: str) -> str:
    return f"data: {payload}\n\n"


COMPLETION = '{"id":"id-1","object":"text_completion","created":1700000000,"model":"m",'
CHAT = '{"id":"id-1","object":"chat.completion.chunk","created":1700000000,"model":"m","system_fingerprint":null,'


def test_completion_stream_with_echo_and_usage():
    events = [TextDelta("\u00e9"), Finished("length", 2, 1)]
    assert stream(completion(echo=True, stream_options={"include_usage": True}), events) == [
        line(COMPLETION + '"choices":[{"index":0,"text":"hi","logprobs":null,"finish_reason":null}],"usage":null}'),
        line(
            COMPLETION + '"choices":[{"index":0,"text":"\\u00e9","logprobs":null,"finish_reason":null}],"usage":null}'
        ),
        line(COMPLETION + '"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"length"}],"usage":null}'),
        line(COMPLETION + '"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}'),
        line("[DONE]"),
    ]


def test_completion_stream_without_usage_has_no_usage_key():
    assert stream(completion(), [TextDelta("a"), Finished("stop", 2, 2)]) == [
        line(COMPLETION + '"choices":[{"index":0,"text":"a","logprobs":null,"finish_reason":null}]}'),
        line(COMPLETION + '"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"stop"}]}'),
        line("[DONE]"),
    ]


def test_chat_stream_opens_with_the_role_and_ends_with_an_empty_delta():
    assert stream(chat(), [TextDelta("ok"), Finished("stop", 7, 2)]) == [
        line(
            CHAT + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
            '"finish_reason":null}]}'
        ),
        line(CHAT + '"choices":[{"index":0,"delta":{"content":"ok"},"logprobs":null,"finish_reason":null}]}'),
        line(CHAT + '"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}'),
        line("[DONE]"),
    ]
    with_usage = stream(chat(stream_options={"include_usage": True}), [Finished("length", 7, 0)])
    assert with_usage[-2] == line(
        CHAT + '"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":0,"total_tokens":7}}'
    )
    assert len(with_usage) == 4 and all(chunk.endswith(',"usage":null}\n\n') for chunk in with_usage[:2])


def test_a_failure_mid_stream_ends_it_with_the_error_envelope():
    failed = stream(chat(), [TextDelta("x"), InvalidRequest("The model 'm' cannot be served", param="model")])
    assert len(failed) == 3 and failed[-1] == line(
        '{"error":{"message":"The model \'m\' cannot be served","type":"invalid_request_error",'
        '"param":"model","code":null}}'
    )
    crashed = stream(completion(), [RuntimeError("CUDA error: details stay in the log")])
    assert crashed == [
        line(
            '{"error":{"message":"The server had an error while generating.","type":"server_error",'
            '"param":null,"code":null}}'
        )
    ]
