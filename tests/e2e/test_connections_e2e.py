"""Long generations hold no database connection: with a pool of 2, eight concurrent streams leave the API
answering other requests, where each stream used to hold a connection to its end (15 streams exhausted the
default pool; `GET /v1/models` then failed with 500 and /readyz called the database unreachable)."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.e2e.conftest import make_key
from tests.e2e.server import LiveServer

pytestmark = pytest.mark.slow

STREAMS = 8
SMALL_POOL = {"TUNESERVE_DB_POOL_SIZE": "2", "TUNESERVE_DB_MAX_OVERFLOW": "0", "TUNESERVE_DB_POOL_TIMEOUT_SECONDS": "2"}


def test_streams_do_not_hold_connections_and_other_requests_are_answered(pg_stack):
    env = {**pg_stack.env, **SMALL_POOL}
    key = make_key(pg_stack.sessionmaker, "alpha")
    headers = {"Authorization": f"Bearer {key}"}
    started = threading.Barrier(STREAMS + 1, timeout=120)
    done: list[bool] = []
    failures: list[str] = []

    def stream(i: int) -> None:
        body = {
            "model": "tuneserve-tiny",
            "prompt": f"{i} stream number {i}: ",
            "max_tokens": 1500,
            "temperature": 0,
            "stream": True,
        }
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=300) as r:
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.read()!r}")
                    started.abort()
                    return
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                started.wait()
                last = [line for line in lines if line.startswith("data: ")][-1]
                done.append(last == "data: [DONE]")
        except Exception as exc:  # reported below, not lost in the thread
            failures.append(repr(exc))

    with LiveServer(env, pg_stack.tmp / "api.log") as server:
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
        for thread in threads:
            thread.start()
        try:
            started.wait()  # every stream has its first token and is still generating
        except threading.BrokenBarrierError:
            raise AssertionError(failures) from None
        answers = [httpx.get(f"{server.url}/v1/models", headers=headers, timeout=30) for _ in range(10)]
        ready = httpx.get(f"{server.url}/readyz", timeout=30)
        still_streaming = STREAMS - len(done)
        for thread in threads:
            thread.join(timeout=300)

    assert not failures, failures
    assert [r.status_code for r in answers] == [200] * 10, [r.text for r in answers if r.status_code != 200]
    assert ready.status_code == 200 and ready.json()["database"] == "ok"
    # The requests above ran while more streams were open than the pool has connections.
    assert still_streaming > 2, f"only {still_streaming} streams were still open"
    assert done == [True] * STREAMS
