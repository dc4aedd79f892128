"""/v1/completions and /v1/chat/completions through the ASGI app with the real engine on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from sqlalchemy import select

from app.tables import FineTunedModel, JobCheckpoint
from worker.runner import run_job

pytestmark = pytest.mark.slow


@pytest.fixture
def fine_tuned_model(client, ctx, create_job) -> str:
    job_id = create_job(suffix="serve", n_checkpoints=2)
    assert run_job(ctx, job_id) == "succeeded"
    return client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]


def adapter_path(ctx, model: str, checkpoint_step: int | None = None):
    """The adapter the job wrote: the published one, or a checkpoint's as the job's checkpoint row records it."""
    with ctx.sessionmaker() as session:
        published = session.scalar(select(FineTunedModel).where(FineTunedModel.id == model))
        key = published.storage_key
        if checkpoint_step is not None:
            key = session.scalar(
                select(JobCheckpoint.storage_key).where(
                    JobCheckpoint.job_id == published.job_id, JobCheckpoint.step_number == checkpoint_step
                )
            )
    return ctx.storage.local_dir(key)


def peft_greedy(ctx, adapter, messages: list[dict], max_tokens: int) -> str:
    """What PEFT's own `generate` answers with this adapter (None: the base model), greedy: the reference the
    served answer must equal."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.ml.chat import end_of_turn_ids, render_chat_prompt

    base_dir = ctx.registry.resolve("tuneserve-tiny").name_or_path
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    stops = end_of_turn_ids(tokenizer) | {tokenizer.eos_token_id}
    prompt = torch.tensor([render_chat_prompt(messages, tokenizer)])
    with torch.no_grad():
        output = model.generate(prompt, max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(stops))
    new = [t for t in output[0, prompt.shape[1] :].tolist() if t not in stops]
    return tokenizer.decode(new, skip_special_tokens=True)


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


def chat_text(client, model: str, messages: list[dict], max_tokens: int) -> str:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_fine_tuned_models_and_their_checkpoints_answer_as_peft_does(client, ctx, fine_tuned_model):
    """The served answer is PEFT's answer with that model's own adapter, and the adapters make a difference."""
    messages = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "What is 7 plus 7?"}]
    checkpoint = f"{fine_tuned_model}:ckpt-step-5"
    served = {
        model: chat_text(client, model, messages, 16) for model in ("tuneserve-tiny", fine_tuned_model, checkpoint)
    }
    expected = {
        "tuneserve-tiny": peft_greedy(ctx, None, messages, 16),
        fine_tuned_model: peft_greedy(ctx, adapter_path(ctx, fine_tuned_model), messages, 16),
        checkpoint: peft_greedy(ctx, adapter_path(ctx, fine_tuned_model, checkpoint_step=5), messages, 16),
    }
    assert served == expected
    assert len(set(served.values())) == 3, served  # base, step 5 and step 10 each answer differently


def test_n_and_prompt_lists(client):
    """Choices come prompt by prompt, n each; choice j of a prompt is that prompt sampled with seed + j."""
    body = {"model": "tuneserve-tiny", "prompt": ["a", "b"], "n": 2, "max_tokens": 8, "seed": 1, "echo": True}
    r = client.post("/v1/completions", json=body)
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    texts = [c["text"] for c in choices]

    def alone(prompt: str, seed: int) -> str:
        single = {**body, "prompt": prompt, "n": 1, "seed": seed}
        return client.post("/v1/completions", json=single).json()["choices"][0]["text"]

    assert texts == [alone("a", 1), alone("a", 2), alone("b", 1), alone("b", 2)]
    assert texts[0].startswith("a") and texts[2].startswith("b")  # echo shows which prompt each answers
    assert texts[0] != texts[1] and texts[2] != texts[3]  # the n samples of one prompt differ
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == sum(
        client.post("/v1/completions", json={**body, "prompt": p, "n": 1}).json()["usage"]["prompt_tokens"]
        for p in ("a", "b")
    )


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
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 1, "echo": True, "stream": True}, "echo"),
        ({"max_tokens": 0, "logprobs": 1}, "max_tokens"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [1.5]}, "prompt"),
        ({"prompt": [[1], [-2]]}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": [2**40]}, "prompt"),
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


def metric(text: str, name: str) -> float:
    [value] = [float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name]
    return value


def test_metrics_count_what_the_engine_did(client, fine_tuned_model):
    names = [
        f"tuneserve_inference_{name}_total" for name in ("requests", "prefills", "generated_tokens", "adapter_loads")
    ]
    before = {name: metric(client.get("/metrics").text, name) for name in names}
    completion = {"prompt": "hi", "max_tokens": 3, "temperature": 0}
    r = client.post("/v1/completions", json={"model": "tuneserve-tiny", **completion})
    tokens = r.json()["usage"]["completion_tokens"]
    r = client.post("/v1/completions", json={"model": fine_tuned_model, **completion})
    tokens += r.json()["usage"]["completion_tokens"]
    after = {name: metric(client.get("/metrics").text, name) for name in names}
    assert {name: after[name] - before[name] for name in names} == {
        "tuneserve_inference_requests_total": 2,
        "tuneserve_inference_prefills_total": 2,
        "tuneserve_inference_generated_tokens_total": tokens,
        "tuneserve_inference_adapter_loads_total": 1,
    }


def test_one_request_cannot_become_thousands_of_sequences_or_messages(client):
    """1,000 prompts x n=16 used to become 16,000 sequences that held the engine for minutes; a 2,000-message
    chat was rendered (quadratically) before being refused for length. Both are refused before any engine work."""
    before = metric(client.get("/metrics").text, "tuneserve_inference_requests_total")
    body = {"model": "tuneserve-tiny", "prompt": ["x"] * 1000, "n": 16, "max_tokens": 1}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences"
    assert r.json()["error"]["param"] == "n"
    r = client.post("/v1/completions", json={**body, "n": 1, "prompt": ["x"] * 65})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(2049)]
    r = client.post("/v1/chat/completions", json={"model": "tuneserve-tiny", "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages"
    assert metric(client.get("/metrics").text, "tuneserve_inference_requests_total") == before
    r = client.post("/v1/completions", json={**body, "prompt": ["x"] * 4, "n": 16})  # 64: at the limit
    assert r.status_code == 200 and len(r.json()["choices"]) == 64


def sdk(client):
    """The openai SDK speaking to the app through the test client."""
    import openai

    key = client.headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=key, http_client=client, max_retries=0)


def peft_log_softmax(ctx, adapter, ids: list[int]) -> torch.Tensor:
    """PEFT's log-softmax [len(ids) - 1, vocab]: row j scores token j + 1 (None: the base model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        ctx.registry.resolve("tuneserve-tiny").name_or_path, dtype=torch.float32
    )
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def test_lm_eval_style_scoring_equals_peft(client, ctx, fine_tuned_model):
    """What lm-evaluation-harness sends for a loglikelihood request: token-id prompts, echo, max_tokens 1,
    logprobs 1, temperature 0, through the openai SDK. Every prompt token's logprob is PEFT's log-softmax, the first
    is null, the last entry is the generated token, and top_logprobs holds the likeliest token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ctx.registry.resolve("tuneserve-tiny").name_or_path)
    prompts = [tokenizer.encode("Question: 2+2? Answer: 4"), tokenizer.encode("The sky is blue")]
    answer = sdk(client).completions.create(
        model=fine_tuned_model, prompt=prompts, echo=True, max_tokens=1, logprobs=1, temperature=0, seed=1234
    )
    adapter = adapter_path(ctx, fine_tuned_model)
    for choice, ids in zip(sorted(answer.choices, key=lambda c: c.index), prompts, strict=True):
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(ids) + 1 and logprobs.token_logprobs[0] is None
        expected = peft_log_softmax(ctx, adapter, ids)
        scored = logprobs.token_logprobs[1 : len(ids)]
        assert scored == pytest.approx([expected[j, ids[j + 1]].item() for j in range(len(ids) - 1)], abs=1e-4)
        for j, top in enumerate(logprobs.top_logprobs[1 : len(ids)]):
            # The likeliest token, and the prompt's own token as OpenAI always lists it.
            likeliest = tokenizer.decode([int(expected[j].argmax())])
            assert top[likeliest] == pytest.approx(expected[j].max().item(), abs=1e-4)
            assert top[logprobs.tokens[j + 1]] == pytest.approx(scored[j]) and len(top) <= 2
        assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:j])) for j in range(len(ids) + 1)]


def test_scoring_only_with_max_tokens_zero(client, ctx):
    """max_tokens 0 with echo: the prompt scored, nothing generated, on the base model."""
    r = client.post("/v1/completions", json={"model": "tuneserve-tiny", "prompt": "hello world", "echo": True,
                                             "max_tokens": 0, "logprobs": 2})  # fmt: skip
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert choice["text"] == "hello world" and r.json()["usage"]["completion_tokens"] == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ctx.registry.resolve("tuneserve-tiny").name_or_path)
    ids = [tokenizer.bos_token_id, *tokenizer.encode("hello world", add_special_tokens=False)]
    expected = peft_log_softmax(ctx, None, ids)
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert logprobs["token_logprobs"][1:] == pytest.approx(
        [expected[j, ids[j + 1]].item() for j in range(len(ids) - 1)], abs=1e-4
    )
    # Keyed by text: two of the top 2 that decode alike (bytes of one character) are one entry, the likelier.
    assert all(1 <= len(top) <= 3 for top in logprobs["top_logprobs"][1:]) and logprobs["top_logprobs"][0] is None
    for j, top in enumerate(logprobs["top_logprobs"][1:]):
        assert max(top.values()) == pytest.approx(expected[j].max().item(), abs=1e-4)


def test_completion_logprobs_streamed_equal_whole(client, fine_tuned_model):
    body = {"model": fine_tuned_model, "prompt": "Once upon", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    assert "".join(whole["logprobs"]["tokens"]) == whole["text"] or whole["finish_reason"] == "stop"
    streamed = [c["choices"][0] for c in sse_events(client.post("/v1/completions", json={**body, "stream": True}))[:-1]]
    merged = {key: sum((c["logprobs"][key] for c in streamed if c["logprobs"]), []) for key in whole["logprobs"]}
    assert merged == whole["logprobs"]
    assert "".join(c["text"] for c in streamed) == whole["text"]


def test_chat_logprobs_through_the_sdk_streamed_and_whole(client, ctx, fine_tuned_model):
    """A classifier's use: the probability of each answer token, and its alternatives, in OpenAI's shape."""
    messages = [{"role": "user", "content": "What is 2 plus 2?"}]
    openai_client = sdk(client)
    whole = openai_client.chat.completions.create(
        model=fine_tuned_model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    ).choices[0]
    content = whole.logprobs.content
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)  # greedy: its own top
    assert all(bytes(t.bytes).decode(errors="replace") == t.token for t in content)
    if whole.finish_reason == "length":
        assert "".join(t.token for t in content) == whole.message.content
    stream = openai_client.chat.completions.create(
        model=fine_tuned_model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
        stream=True,
    )  # fmt: skip
    streamed = [t for chunk in stream for choice in chunk.choices if choice.logprobs for t in choice.logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]
    plain = openai_client.chat.completions.create(
        model=fine_tuned_model, messages=messages, max_tokens=6, temperature=0
    )
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.message.content


@pytest.mark.parametrize(
    "body,param",
    [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")],
)
def test_chat_logprobs_errors(client, body, param):
    r = client.post(
        "/v1/chat/completions", json={"model": "tuneserve-tiny", "messages": [{"role": "user", "content": "x"}], **body}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_fine_tuned_model_tokenizes_as_its_base(client, app_client, beta_key, fine_tuned_model):
    body = {"prompt": "What is 2 plus 2?", "return_token_strs": True}
    tuned = client.post("/tokenize", json={**body, "model": fine_tuned_model})
    assert tuned.status_code == 200 and tuned.json() == client.post("/tokenize", json=body).json()
    info = client.get("/tokenizer_info", params={"model": fine_tuned_model})
    assert info.status_code == 200 and info.json() == client.get("/tokenizer_info").json()
    # Another project's model is not found, as everywhere else.
    beta = {"Authorization": f"Bearer {beta_key}"}
    r = app_client.post("/tokenize", json={**body, "model": fine_tuned_model}, headers=beta)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
