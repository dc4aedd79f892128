"""Every response carries an `x-request-id`: successes, errors of every kind, and streams."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from fastapi.testclient import TestClient

from app.api.request_id import MAX_CLIENT_ID_LENGTH, RequestIdMiddleware, current_request_id, uvicorn_log_config
from app.main import create_app

GENERATED = re.compile(r"req_[0-9a-f]{32}")


def test_each_response_gets_its_own_generated_id(app_client):
    first, second = app_client.get("/healthz"), app_client.get("/healthz")
    assert GENERATED.fullmatch(first.headers["x-request-id"])
    assert GENERATED.fullmatch(second.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_a_sane_client_id_is_kept(app_client):
    r = app_client.get("/healthz", headers={"X-Request-Id": "trace-42/a.b_c"})
    assert r.headers["x-request-id"] == "trace-42/a.b_c"


@pytest.mark.parametrize(
    "sent", ["", "has space", "tab\there", "x" * (MAX_CLIENT_ID_LENGTH + 1), "caf\u00e9"], ids=repr
)
def test_an_unfit_client_id_is_replaced(app_client, sent):
    r = app_client.get("/healthz", headers={"X-Request-Id": sent.encode("latin-1")})
    assert GENERATED.fullmatch(r.headers["x-request-id"])


def test_error_envelopes_carry_the_id(client):
    unauthenticated = client.get("/v1/files", headers={"Authorization": "Bearer ts-not-a-real-key"})
    for r in (unauthenticated, client.get("/v1/nope"), client.get("/v1/files/file-absent")):
        assert r.status_code in (401, 404) and "error" in r.json(), r.text
        assert GENERATED.fullmatch(r.headers["x-request-id"]), r.headers


def test_an_unhandled_500_carries_the_id_and_logs_it(settings, caplog):
    app = create_app(settings)

    @app.get("/boom")
    def boom():
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level(logging.ERROR):
        r = c.get("/boom", headers={"X-Request-Id": "trace-of-a-crash"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert r.headers["x-request-id"] == "trace-of-a-crash"
    assert "request_id=trace-of-a-crash" in caplog.text


def test_a_streamed_completion_carries_the_id(client):
    body = {"model": "tuneserve-tiny", "prompt": "hello", "max_tokens": 3, "stream": True}
    r = client.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-of-a-stream"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-request-id"] == "trace-of-a-stream"


def test_the_middleware_passes_body_chunks_through_one_by_one():
    """A buffering middleware would hold the first chunk of a stream until the last was produced."""
    sent: list[dict] = []

    async def streaming_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        assert len(sent) == 2, "the first chunk was held back"
        await send({"type": "http.response.body", "body": b"two", "more_body": False})

    async def record(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    asyncio.run(RequestIdMiddleware(streaming_app)(scope, None, record))
    assert [m.get("body") for m in sent] == [None, b"one", b"two"]
    assert GENERATED.fullmatch(dict(sent[0]["headers"])[b"x-request-id"].decode())


def test_uvicorn_access_lines_end_with_the_request_id():
    from uvicorn.logging import AccessFormatter

    config = uvicorn_log_config()
    assert config["handlers"]["access"]["filters"] == ["request_id"]
    formatter = AccessFormatter(config["formatters"]["access"]["fmt"], use_colors=False)
    log_filter = config["filters"]["request_id"]["()"]()
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", "/healthz", "1.1", 200),
        None,
    )
    token = current_request_id.set("req_in_the_log")
    try:
        assert log_filter.filter(record)
    finally:
        current_request_id.reset(token)
    assert formatter.format(record).endswith('"GET /healthz HTTP/1.1" 200 OK request_id=req_in_the_log')
