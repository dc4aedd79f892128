"""Per-project rate limits: one project's burst is refused with 429 and OpenAI's headers; another project is not
affected; the buckets refill at their per-minute rate."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.errors import InvalidRequest, RateLimited
from app.main import create_app
from app.services.rate_limits import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_buckets_refuse_take_nothing_and_refill():
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=2, tokens_per_minute=600, clock=clock)
    headers = limiter.admit("a", 100)
    assert headers["x-ratelimit-remaining-requests"] == "1" and headers["x-ratelimit-remaining-tokens"] == "500"
    limiter.admit("a", 100)
    with pytest.raises(RateLimited) as refused:
        limiter.admit("a", 1)
    assert refused.value.type == "requests" and refused.value.status == 429
    assert refused.value.retry_after == pytest.approx(30.0)  # one request refills in 60 s / 2
    limiter.admit("b", 100)  # another project has its own buckets
    clock.now = 30.0
    limiter.admit("a", 100)  # one request back after 30 s
    tokens = RateLimiter(requests_per_minute=100, tokens_per_minute=600, clock=clock)
    tokens.admit("a", 500)
    with pytest.raises(RateLimited) as refused:
        tokens.admit("a", 200)
    assert refused.value.type == "tokens" and refused.value.retry_after == pytest.approx(10.0)  # 100 at 10/s
    assert tokens.admit("a", 100)["x-ratelimit-remaining-tokens"] == "0"  # the refusal took nothing
    with pytest.raises(InvalidRequest):
        tokens.admit("a", 601)  # could never fit in a minute's tokens


@pytest.fixture
def settings(tmp_path, db_url):
    return Settings(data_dir=tmp_path / "data", database_url=db_url, rate_limit_requests_per_minute=2)


def test_a_projects_burst_gets_429_with_headers_and_others_are_served(settings, alpha_key, beta_key):
    body = {"model": "tuneserve-tiny", "prompt": "hi", "max_tokens": 1}
    with TestClient(create_app(settings)) as client:
        alpha = {"Authorization": f"Bearer {alpha_key}"}
        answers = [client.post("/v1/completions", json=body, headers=alpha) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 429]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
        assert answers[1].headers["x-ratelimit-remaining-requests"] == "0"
        refused = answers[2]
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1
        streamed = client.post(
            "/v1/completions", json={**body, "stream": True}, headers={"Authorization": f"Bearer {beta_key}"}
        )
        assert streamed.status_code == 200 and streamed.headers["x-ratelimit-remaining-requests"] == "1"


def test_a_request_that_would_queue_too_many_sequences_is_refused_whole_before_its_stream_opens(settings, alpha_key):
    settings = settings.model_copy(update={"max_waiting_per_project": 2, "rate_limit_requests_per_minute": None})
    body = {"model": "tuneserve-tiny", "prompt": "hi", "max_tokens": 2, "stream": True}
    with TestClient(create_app(settings)) as client:
        alpha = {"Authorization": f"Bearer {alpha_key}"}
        refused = client.post("/v1/completions", json={**body, "n": 3}, headers=alpha)
        assert refused.status_code == 429, refused.text  # a JSON error, not an event stream that fails midway
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused.headers["retry-after"] == "1"
        streamed = client.post("/v1/completions", json={**body, "n": 2}, headers=alpha)
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        metrics = client.get("/metrics").text
        assert "\ntuneserve_inference_requests_total 2\n" in metrics  # the refused request queued nothing
