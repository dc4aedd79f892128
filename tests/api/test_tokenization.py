"""/tokenize, /detokenize and /tokenizer_info in vLLM's shapes, on the tiny model's tokenizer."""

from __future__ import annotations

import pytest

BASE = "tuneserve-tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from app.ml.base_model import load_tokenizer
    from app.ml.tiny import ensure_tiny_model

    return load_tokenizer(str(ensure_tiny_model(tmp_path_factory.mktemp("tiny"))))


def test_a_text_tokenizes_as_completions_feed_it(client, tokenizer):
    r = client.post("/tokenize", json={"model": BASE, "prompt": "héllo world"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == [tokenizer.bos_token_id, *tokenizer.encode("héllo world", add_special_tokens=False)]
    assert body["count"] == len(body["tokens"]) and body["token_strs"] is None and body["max_model_len"] > 0
    completion = client.post("/v1/completions", json={"model": BASE, "prompt": "héllo world", "max_tokens": 1})
    assert completion.json()["usage"]["prompt_tokens"] == body["count"]
    # What lm-eval asks when probing for a remote tokenizer: the text alone, with its token strings.
    bare = client.post("/tokenize", json={"prompt": "test", "add_special_tokens": False, "return_token_strs": True})
    assert bare.json()["tokens"] == tokenizer.encode("test", add_special_tokens=False)
    assert bare.json()["token_strs"] == tokenizer.convert_ids_to_tokens(bare.json()["tokens"])


def test_a_conversation_tokenizes_as_chat_renders_it(client):
    tokens = client.post("/tokenize", json={"model": BASE, "messages": CHAT}).json()["tokens"]
    chat = client.post("/v1/chat/completions", json={"model": BASE, "messages": CHAT, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == len(tokens)


def test_detokenize_inverts_tokenize(client):
    tokens = client.post("/tokenize", json={"prompt": "héllo, wörld", "add_special_tokens": False}).json()["tokens"]
    r = client.post("/detokenize", json={"model": BASE, "tokens": tokens})
    assert r.status_code == 200 and r.json() == {"prompt": "héllo, wörld"}


def test_tokenizer_info(client, tokenizer):
    r = client.get("/tokenizer_info", params={"model": BASE})
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == tokenizer.chat_template and info["model_max_length"] > 0
    assert client.get("/tokenizer_info").json() == info  # the default model


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/tokenize", {"prompt": "a", "messages": CHAT}, "messages"),
        ("/tokenize", {}, "messages"),
        ("/tokenize", {"prompt": "a", "model": "nope"}, "model"),
        ("/tokenize", {"prompt": "a", "bogus": 1}, "bogus"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/detokenize", {"tokens": []}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens.0"),
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
        ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
    ],
)
def test_bad_requests_name_their_parameter(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param


def test_base_models_need_no_key_fine_tuned_ones_do(client, app_client):
    """As vLLM serves them (lm-eval's remote tokenizer sends no key); a wrong key is still refused."""
    r = client.get("/tokenizer_info", params={"model": "ft:nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    keyed = client.post("/tokenize", json={"prompt": "a"}).json()
    app_client.headers.pop("Authorization")
    assert app_client.post("/tokenize", json={"prompt": "a"}).json() == keyed
    assert app_client.get("/tokenizer_info").status_code == 200
    r = app_client.get("/tokenizer_info", params={"model": "ft:nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = app_client.post("/detokenize", json={"tokens": [65]}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
