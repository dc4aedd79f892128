"""Forwarding inference to replicas (`tuneserve inference`): the API authenticates the caller and checks the model,
then relays the request to the replica that owns the model, and the replica's answer (streamed as it comes) back.

A model's replica is chosen by rendezvous hashing: each replica scores `hash(replica, model)` and the highest
wins, so a model's adapter stays hot on one replica, and adding or removing a replica moves only the models it
wins or held. A replica that cannot be reached is skipped for a while and its models go to their next-ranked one.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
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
        # stream holds a connection for its whole answer, so the pool is sized for many at once. Made on first
        # use, inside the server's event loop.
        self._session: aiohttp.ClientSession | None = None
        self._in_flight = 0  # relays open (one connection each), counted here so overload is refused at once

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=None),
                auto_decompress=False,  # bytes are relayed as the replica sent them
            )
        return self._session

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
        if self._in_flight >= MAX_CONNECTIONS:  # this API is at its limit of open relays: overload, fail fast
            raise ServiceUnavailable("Too many requests in flight. Retry shortly.", code="server_busy")
        for replica in self._order(model):
            try:
                upstream = await self._client().post(f"{replica}{path}", data=body, headers=headers)
            except (TimeoutError, aiohttp.ClientError, OSError):  # nothing was answered: try the next replica
                self._down_until[replica] = time.monotonic() + DOWN_SECONDS
                continue
            self._down_until.pop(replica, None)
            return self._relay(upstream, replica)
        raise ServiceUnavailable("No inference replica is reachable. Retry shortly.", code="inference_unavailable")

    def _relay(self, upstream: aiohttp.ClientResponse, replica: str) -> StreamingResponse:
        headers = {
            k.lower(): v
            for k, v in upstream.headers.items()
            if k.lower() in RELAYED_HEADERS or k.lower().startswith("x-ratelimit-")
        }
        headers[REPLICA_HEADER] = replica
        streamed = upstream.headers.get("content-type", "").startswith("text/event-stream")

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
            except (aiohttp.ClientError, OSError):  # the replica died mid-answer: the 200 is out, say so in the stream
                self._down_until[replica] = time.monotonic() + DOWN_SECONDS
                if streamed:
                    yield REPLICA_LOST_EVENT

        def ended() -> None:
            self._in_flight -= 1

        self._in_flight += 1
        media_type = upstream.headers.get("content-type")
        return _Relayed(upstream, ended, body(), status_code=upstream.status, headers=headers, media_type=media_type)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class _Relayed(StreamingResponse):
    """A replica's answer relayed; the upstream response is closed however the relay ends, even when Starlette
    cancels it before the first chunk (a client that left while the replica was still answering). Closing it is
    what tells the replica, which then stops the sequences."""

    def __init__(self, upstream: aiohttp.ClientResponse, ended: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._upstream = upstream
        # Once, when the relay ends, or when this object is collected should it never be sent: the count of open
        # relays must not creep up, or the API would refuse everything.
        self._ended = weakref.finalize(self, ended)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Read to the end, the connection goes back to the pool; otherwise release() closes it, which the
            # replica sees as the client leaving (tests/api/test_replica_relay.py).
            self._upstream.release()
            self._ended()
