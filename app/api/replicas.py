"""Forwarding inference to replicas (`tuneserve inference`): the API authenticates the caller and checks the model,
then relays the request to the replica that owns the model, and the replica's answer (streamed as it comes) back.

A model's replica is chosen by rendezvous hashing: each replica scores `hash(replica, model)` and the highest
wins, so a model's adapter stays hot on one replica, and adding or removing a replica moves only the models it
wins or held. A replica that cannot be reached is skipped for a while and its models go to their next-ranked one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.errors import ServiceUnavailable
from app.services.keys import CurrentProject

# The headers by which a replica knows the request comes from the API, and for whom.
INTERNAL_TOKEN_HEADER = "x-tuneserve-internal-token"
PROJECT_ID_HEADER = "x-tuneserve-project-id"
PROJECT_NAME_HEADER = "x-tuneserve-project-name"
REPLICA_HEADER = "x-tuneserve-replica"  # on answers: which replica served (for operators and tests)
# A replica's answer headers that mean something to the client.
RELAYED_HEADERS = ("content-type", "cache-control", "retry-after", "x-request-id")
# An unreachable replica is not tried again for this long (its models go to the next replica meanwhile).
DOWN_SECONDS = 10.0
# What a stream says when its replica dies mid-answer, in the error envelope in-process streams use.
REPLICA_LOST_EVENT = (
    b'data: {"error":{"message":"The inference replica serving this request stopped answering.",'
    b'"type":"server_error","param":null,"code":"replica_lost"}}\n\n'
)
MAX_CONNECTIONS = 2000  # relays in flight at once, over all replicas


def rank(replicas: list[str], model: str) -> list[str]:
    """Replicas in the order they should serve `model`: the first unless it is down, then the next."""

    def score(replica: str) -> bytes:
        return hashlib.sha256(f"{replica}\n{model}".encode()).digest()

    return sorted(replicas, key=score, reverse=True)


class ReplicaPool:
    def __init__(self, replicas: list[str], token: str) -> None:
        self._replicas = [url.rstrip("/") for url in replicas]
        self._token = token
        self._down_until: dict[str, float] = {}
        # No read timeout: a generation takes as long as it takes, and the client's disconnect ends it. Every
        # stream holds a connection for its whole answer, so the pool is sized for many at once.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(30.0, connect=2.0, read=None),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=100),
        )

    def _order(self, model: str) -> list[str]:
        now = time.monotonic()
        ranked = rank(self._replicas, model)
        return [r for r in ranked if self._down_until.get(r, 0) <= now] + [
            r for r in ranked if self._down_until.get(r, 0) > now
        ]

    async def forward(
        self, path: str, body: bytes, model: str, project: CurrentProject, request_id: str | None
    ) -> StreamingResponse:
        headers = {
            "content-type": "application/json",
            INTERNAL_TOKEN_HEADER: self._token,
            PROJECT_ID_HEADER: project.id,
            PROJECT_NAME_HEADER: quote(project.name, safe=""),  # header values are ASCII; names need not be
        }
        if request_id:
            headers["x-request-id"] = request_id
        for replica in self._order(model):
            outgoing = self._client.build_request("POST", f"{replica}{path}", content=body, headers=headers)
            try:
                upstream = await self._client.send(outgoing, stream=True)
            except httpx.PoolTimeout:  # this API is at its limit of open relays: overload, not a dead replica
                raise ServiceUnavailable("Too many requests in flight. Retry shortly.", code="server_busy") from None
            except httpx.TransportError:  # nothing was answered: the request can go to the next replica
                self._down_until[replica] = time.monotonic() + DOWN_SECONDS
                continue
            self._down_until.pop(replica, None)
            return self._relay(upstream, replica)
        raise ServiceUnavailable("No inference replica is reachable. Retry shortly.", code="inference_unavailable")

    def _relay(self, upstream: httpx.Response, replica: str) -> StreamingResponse:
        headers = {k: v for k, v in upstream.headers.items() if k in RELAYED_HEADERS or k.startswith("x-ratelimit-")}
        headers[REPLICA_HEADER] = replica
        streamed = upstream.headers.get("content-type", "").startswith("text/event-stream")

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.TransportError:  # the replica died mid-answer: the 200 is out, say it in the stream
                self._down_until[replica] = time.monotonic() + DOWN_SECONDS
                if streamed:
                    yield REPLICA_LOST_EVENT

        media_type = upstream.headers.get("content-type")
        return _Relayed(upstream, body(), status_code=upstream.status_code, headers=headers, media_type=media_type)

    async def close(self) -> None:
        await self._client.aclose()


class _Relayed(StreamingResponse):
    """A replica's answer relayed; the upstream response is closed however the relay ends, even when Starlette
    cancels it before the first chunk (a client that left while the replica was still answering). Closing it is
    what tells the replica, which then stops the sequences."""

    def __init__(self, upstream: httpx.Response, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._upstream.aclose()
