"""/v1/completions and /v1/chat/completions through the ASGI app with the real engine on the tiny model."""

from __future__ import annotations

import json

import pytest

from worker.runner import run_job

pytestmark = pytest.mark.slow


@pytest.fixture
def fine_tuned_model(client, ctx, create_job) -> str:
    job_id = create_job(suffix="serve")
    assert run_job(ctx, job_id) == "succeeded"
    return client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]


def sse_events(response) -> list:
    events = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_completion_on_the_base_model(client):
    r = client.post("/v1/completions", json={"model": "tuneserve-tiny", "prompt": "hello", "max_tokens": 5,
                                             "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 5


def test_chat_on_a_fine_tuned_model_and_seeds(client, fine_tuned_model):
    body = {"model": fine_tuned_model, "messages": [{"role": "user", "content": "What is 3 plus 3?"}],
            "max_tokens": 20, "temperature": 0.8, "seed": 11}  # fmt: skip
    first, again = client.post("/v1/chat/completions", json=body), client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["content"] == again.json()["choices"][0]["message"]["content"]
    assert first.json()["object"] == "chat.completion"
    assert first.json()["choices"][0]["message"]["role"] == "assistant"


def test_n_and_prompt_lists(client):
    r = client.post("/v1/completions", json={"model": "tuneserve-tiny", "prompt": ["a", "b"], "n": 2, "max_tokens": 3,
                                             "seed": 1})  # fmt: skip
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]


def test_streaming_chat_with_usage(client, fine_tuned_model):
    body = {"model": fine_tuned_model, "messages": [{"role": "user", "content": "What is 2 plus 2?"}],
            "max_tokens": 12, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    plain = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert streamed == plain["choices"][0]["message"]["content"]


def test_stop_and_echo(client):
    base = {"model": "tuneserve-tiny", "prompt": "abc", "max_tokens": 8, "temperature": 0}
    text = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    echoed = client.post("/v1/completions", json={**base, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "abc" + text
    assert len(text) > 2
    stop = text[1:3]
    stopped = client.post("/v1/completions", json={**base, "stop": stop}).json()["choices"][0]
    assert stopped["text"] == text[: text.find(stop)] and stopped["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "ft:nope"}, "model"),
        ({"presence_penalty": 1}, "presence_penalty"),
        ({"logprobs": 2}, "logprobs"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_completion_request_errors(client, body, param):
    r = client.post("/v1/completions", json={"model": "tuneserve-tiny", "prompt": "x", **body})
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param


def test_prompt_longer_than_the_context_is_400(client, ctx):
    context = ctx.registry.resolve("tuneserve-tiny").context_length
    body = {"model": "tuneserve-tiny", "prompt": "x" * (context + 10), "max_tokens": 5}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_deleted_and_foreign_models_are_404(app_client, client, fine_tuned_model, beta_key):
    chat = {"model": fine_tuned_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    beta = {"Authorization": f"Bearer {beta_key}"}
    for path, body in [("/v1/chat/completions", chat),
                       ("/v1/completions", {"model": fine_tuned_model, "prompt": "hi", "max_tokens": 2})]:  # fmt: skip
        r = app_client.post(path, json=body, headers=beta)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    client.delete(f"/v1/models/{fine_tuned_model}")
    assert client.post("/v1/chat/completions", json=chat).status_code == 404


def test_metrics_include_the_engine(client):
    client.post("/v1/completions", json={"model": "tuneserve-tiny", "prompt": "hi", "max_tokens": 2})
    text = client.get("/metrics").text
    assert "tuneserve_inference_" in text
