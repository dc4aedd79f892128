"""JSON bodies the server cannot handle are refused before any route runs, and nothing is stored.

Each case used to answer 500 (a lone surrogate in job metadata was even committed, and every later listing of
that project's jobs answered 500), or to make the server read an unbounded body.
"""

from __future__ import annotations

import json

import pytest

from app.config import Settings
from tests.datasets.samples import valid_chat_file


@pytest.fixture
def settings(tmp_path, db_url):
    return Settings(data_dir=tmp_path / "data", database_url=db_url, max_json_body_bytes=64 * 1024, max_json_depth=16)


@pytest.fixture
def training_file(client) -> str:
    r = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", valid_chat_file(12))})
    return r.json()["id"]


def post_json(client, path: str, raw: str | bytes, **headers):
    return client.post(path, content=raw, headers={"content-type": "application/json", **headers})


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = {"k": value}
    return value


def test_a_lone_surrogate_is_a_400_naming_where_it_is_and_no_job_is_stored(client, training_file):
    body = {"model": "tuneserve-tiny", "training_file": training_file, "metadata": {"team": "\ud800"}}
    raw = json.dumps(body)  # JSON escapes the surrogate as \ud800, which is valid JSON
    r = post_json(client, "/v1/fine_tuning/jobs", raw)
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata.team"
    assert r.headers["x-request-id"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
    chat = {"model": "tuneserve-tiny", "messages": [{"role": "user", "content": "hi \udfff"}]}
    r = post_json(client, "/v1/chat/completions", json.dumps(chat))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"
    # The same bodies with valid text pass the guard (and a correctly paired surrogate is just an emoji).
    body["metadata"] = {"team": "\ud83d\ude00"}
    assert post_json(client, "/v1/fine_tuning/jobs", json.dumps(body)).status_code == 200


@pytest.mark.parametrize("depth", [17, 600, 5000])
def test_deep_nesting_is_a_400(client, training_file, depth):
    body = {"model": "tuneserve-tiny", "training_file": training_file, "hyperparameters": nested(depth)}
    r = post_json(client, "/v1/fine_tuning/jobs", json.dumps(body) if depth < 900 else _deep_text(depth, body))
    assert r.status_code == 400, r.text
    assert "nests deeper than 16" in r.json()["error"]["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def _deep_text(depth: int, body: dict) -> str:
    # json.dumps itself recurses; write the nesting by hand.
    inner = '{"k": ' * depth + '"x"' + "}" * depth
    return json.dumps({**body, "hyperparameters": None}).replace("null", inner)


def test_a_body_over_the_limit_is_a_413_whether_declared_or_streamed(client):
    big = json.dumps({"model": "tuneserve-tiny", "messages": [{"role": "user", "content": "a" * 70_000}]})
    r = post_json(client, "/v1/chat/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the guard counts as the body arrives
        for _ in range(1000):
            yield b" " * 8192

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "content-length" not in r.request.headers


@pytest.mark.parametrize("content_type", ["application/vnd.openai+json", "application/json; charset=utf-8"])
def test_every_json_media_type_is_checked(client, training_file, content_type):
    """FastAPI parses any */*+json as JSON, so the guard must check them all (one used to slip a surrogate past)."""
    body = {"model": "tuneserve-tiny", "training_file": training_file, "metadata": {"team": "\ud800"}}
    r = post_json(client, "/v1/fine_tuning/jobs", json.dumps(body), **{"content-type": content_type})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata.team"
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_a_body_of_any_other_type_is_capped_too(client):
    r = client.post("/v1/chat/completions", content=b"x" * 70_000, headers={"content-type": "text/plain"})
    assert r.status_code == 413


def test_bodies_within_the_limits_reach_the_routes(client):
    r = post_json(client, "/v1/chat/completions", json.dumps({"model": "no-such-model", "messages": []}))
    assert r.status_code in (400, 404) and r.json()["error"]["code"] != "request_too_large"
    r = post_json(client, "/v1/chat/completions", b"{not json")
    assert r.status_code == 400  # invalid JSON keeps the routes' own answer
