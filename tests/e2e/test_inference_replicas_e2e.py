"""Inference on replicas of its own: an API (no engine) in front of two `tuneserve inference` processes, sharing
Postgres. The caller is authenticated by the API; each model is always served by the same replica (its adapter
stays hot there); a replica that dies is skipped and its models move to the other; streams pass through, and a
client that leaves stops the generation on the replica."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from app.api.replicas import rank
from tests.e2e.conftest import Stack, make_key, wait_until
from tests.e2e.server import LiveServer

pytestmark = pytest.mark.slow

TOKEN = "internal-token-for-the-replica-tests"
MODELS = ["tuneserve-tiny", "tiny-llama3", "tiny-qwen2"]


def replica_env(stack: Stack, name: str) -> dict[str, str]:
    return {**stack.env, "TUNESERVE_DATA_DIR": str(stack.tmp / name), "TUNESERVE_INTERNAL_TOKEN": TOKEN}


def served_by(sdk: openai.OpenAI, model: str) -> str:
    raw = sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0
    )
    assert raw.parse().choices[0].message.content is not None
    return raw.headers["x-tuneserve-replica"]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def test_models_stay_on_their_replica_fail_over_and_stream_through_the_api(pg_stack):
    stack = pg_stack
    with (
        LiveServer(replica_env(stack, "gpu-1"), stack.tmp / "r1.log", command="inference") as first,
        LiveServer(replica_env(stack, "gpu-2"), stack.tmp / "r2.log", command="inference") as second,
    ):
        replicas = [first.url, second.url]
        api_env = {
            **stack.env,
            "TUNESERVE_DATA_DIR": str(stack.tmp / "api"),
            "TUNESERVE_INFERENCE_REPLICAS": json.dumps(replicas),
            "TUNESERVE_INTERNAL_TOKEN": TOKEN,
        }
        with LiveServer(api_env, stack.tmp / "api.log") as api:
            sdk = stack.sdk(api)

            # Each model on the replica that ranks first for it, every time (how models spread over replicas is
            # tests/api/test_replica_ranking.py's; the ports here are random).
            owners = {model: rank(replicas, model)[0] for model in MODELS}
            for _ in range(2):
                assert {model: served_by(sdk, model) for model in MODELS} == owners

            # The API answers for what it owns: a wrong key, and a model this project cannot use.
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{api.url}/v1", api_key="wrong", max_retries=0).completions.create(
                    model="tuneserve-tiny", prompt="hi", max_tokens=1
                )
            with pytest.raises(openai.NotFoundError):
                sdk.completions.create(model="ft:tuneserve-tiny:alpha::nope", prompt="hi", max_tokens=1)
            # A project's name need not be ASCII (the API names it to the replica in a header).
            accented = openai.OpenAI(
                base_url=f"{api.url}/v1", api_key=make_key(stack.sessionmaker, "équipe"), max_retries=0
            )
            assert accented.completions.create(model="tuneserve-tiny", prompt="hi", max_tokens=1).choices
            # A replica answers nobody but the API.
            direct = httpx.post(
                f"{first.url}/v1/completions", json={"model": "tuneserve-tiny", "prompt": "hi", "max_tokens": 1}
            )
            assert direct.status_code == 401 and direct.json()["error"]["code"] == "invalid_internal_token"

            # Streams pass through whole ...
            chunks = list(
                sdk.chat.completions.create(
                    model="tuneserve-tiny",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=8,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            assert chunks[-1].usage.completion_tokens == 8
            # ... and a client that leaves stops the generation on the replica.
            owner = owners["tuneserve-tiny"]
            before = metric(owner, "tuneserve_inference_requests_cancelled_total")
            body = {"model": "tuneserve-tiny", "prompt": "hi", "max_tokens": 2000, "temperature": 0, "stream": True}
            headers = {"Authorization": f"Bearer {sdk.api_key}"}
            with httpx.stream("POST", f"{api.url}/v1/completions", json=body, headers=headers, timeout=60) as r:
                assert r.status_code == 200
                next(r.iter_lines())
            wait_until(
                lambda: metric(owner, "tuneserve_inference_requests_cancelled_total") > before,
                30,
                "the replica to stop the abandoned generation",
            )

            # The owner of tuneserve-tiny dies: its models go to the other replica, without an error.
            dead = first if owner == first.url else second
            dead.kill()
            survivor = second.url if dead is first else first.url
            assert {model: served_by(sdk, model) for model in MODELS} == dict.fromkeys(MODELS, survivor)
