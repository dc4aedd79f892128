"""Both endpoints on every built-in family, through the ASGI app: the text is transformers' greedy continuation
as it reads after the prompt, and `stop` strings end it (streamed or not) with finish_reason "stop"."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from app.ml.chat import render_chat_prompt, render_completion_prompt
from tests.inference.families import FAMILIES, completion_text, generation_config_stop_ids

MAX_TOKENS = 16
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name a colour, please."}]


def greedy_text(model_dir: str, prompt: list[int], continues_prompt: bool) -> tuple[str, str]:
    """(text, finish_reason) of transformers' greedy generate on the base model, as the API reports them: a
    completion as it reads after its prompt, a chat answer on its own (`GenerationRequest.continues_prompt`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stops = generation_config_stop_ids(model)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=stops[0])
    new = out[0, len(prompt) :].tolist()
    context = prompt if continues_prompt else []
    if new and new[-1] in stops:
        return completion_text(tokenizer, context, new[:-1]), "stop"
    return completion_text(tokenizer, context, new), "length"


def stop_string_in(text: str) -> str:
    """Two characters of `text` that first occur after its start (so the cut keeps some text), if any."""
    for start in range(1, len(text) - 1):
        if text.find(text[start : start + 2]) == start:
            return text[start : start + 2]
    return text[:2]


def answered(client: TestClient, path: str, body: dict) -> tuple[str, str]:
    """(text, finish_reason) of an answer in one piece."""
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"], choice["finish_reason"]


def streamed(client: TestClient, path: str, body: dict) -> tuple[str, str]:
    """(text, finish_reason) of a streamed answer."""
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    text, reasons = "", []
    for block in r.text.split("\n\n"):
        if not block.startswith("data: ") or block == "data: [DONE]":
            continue
        for choice in json.loads(block.removeprefix("data: "))["choices"]:
            text += choice["text"] if "text" in choice else choice["delta"].get("content") or ""
            reasons += [choice["finish_reason"]] if choice["finish_reason"] else []
    assert len(reasons) == 1
    return text, reasons[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_both_endpoints_answer_as_transformers_does_and_stop_strings_end_them(family, client, registry):
    from transformers import AutoTokenizer

    model = f"tiny-{family}"
    model_dir = registry.resolve(model).name_or_path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    endpoints = [
        ("/v1/completions", {"prompt": PROMPT}, render_completion_prompt(PROMPT, tokenizer), True),
        ("/v1/chat/completions", {"messages": MESSAGES}, render_chat_prompt(MESSAGES, tokenizer), False),
    ]
    for path, request, prompt_ids, continues_prompt in endpoints:
        body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, **request}
        full = answered(client, path, body)
        assert full == greedy_text(model_dir, prompt_ids, continues_prompt), path
        assert len(full[0]) >= 2, full
        stop = stop_string_in(full[0])
        cut = (full[0][: full[0].find(stop)], "stop")
        assert answered(client, path, {**body, "stop": ["never in the text", stop]}) == cut, (path, stop)
        assert streamed(client, path, {**body, "stop": stop}) == cut, (path, stop)
