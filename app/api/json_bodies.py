"""Request bodies are bounded, and JSON ones sane, before any route sees them.

- Size: every body but a multipart upload (which streams to storage under `max_upload_bytes`,
  app/api/uploads.py): `Content-Length` above `max_json_body_bytes` is refused at once with 413, and a body sent
  without one (chunked) as soon as it grows past the limit, so no request makes the server hold more.
- Shape, for what FastAPI parses as JSON (`application/json` and any `*/*+json`): nesting deeper than
  `max_json_depth` (pydantic and the serializers recurse, and a thousand levels end in RecursionError) and lone
  UTF-16 surrogates (JSON allows "\\ud800"; UTF-8 and so Postgres, orjson and every response do not) are refused
  with 400 naming where they are, before anything is parsed into a model or stored.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import InvalidRequest, PayloadTooLarge, TuneserveError


class JsonBodyGuard:
    """ASGI middleware: reads a body within the size limit, checks it if JSON, then hands it on unchanged."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_depth: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        media_type = _media_type(scope)
        if scope["type"] != "http" or media_type == b"multipart/form-data":  # uploads stream under their own cap
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _refuse(send, self._too_large())
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _refuse(send, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # FastAPI parses application/json and any */*+json as JSON; other bodies are only capped.
        is_json = media_type == b"application/json" or media_type.endswith(b"+json")
        problem = _check(body, self.max_depth) if is_json and body else None
        if problem is not None:
            await _refuse(send, problem)
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"The request body exceeds {self.max_bytes} bytes.", param=None, code="request_too_large"
        )


def _media_type(scope: Scope) -> bytes:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower()
    return b""


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _check(body: bytes, max_depth: int) -> InvalidRequest | None:
    """A 400 for what the routes could not handle, or None (invalid JSON is left to the routes' own error)."""
    try:
        # orjson refuses lone surrogates, the stdlib parser keeps them: try the strict one first, it is faster.
        value: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(body)
        except RecursionError:
            return _too_deep(max_depth, None)
        except ValueError:
            return None
    return _walk(value, max_depth)


def _too_deep(max_depth: int, path: str | None) -> InvalidRequest:
    return InvalidRequest(f"The request body nests deeper than {max_depth} levels.", param=path, code="invalid_value")


def _walk(root: Any, max_depth: int) -> InvalidRequest | None:
    # Iterative, so a deep body cannot exhaust the stack here either.
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > max_depth:
            return _too_deep(max_depth, path or None)
        if isinstance(value, str):
            if _has_lone_surrogate(value):
                return InvalidRequest(
                    "A string in the request holds a lone UTF-16 surrogate, which is not valid Unicode text.",
                    param=path or None,
                    code="invalid_value",
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                if _has_lone_surrogate(key):
                    return InvalidRequest(
                        "A key in the request holds a lone UTF-16 surrogate, which is not valid Unicode text.",
                        param=path or None,
                        code="invalid_value",
                    )
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}" if path else str(i), depth + 1) for i, item in enumerate(value))
    return None


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later reads wait for the disconnect, as they would have

    return replay


async def _refuse(send: Send, error: TuneserveError) -> None:
    body = orjson.dumps(error.envelope())
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def install_json_body_guard(app: FastAPI, *, max_bytes: int, max_depth: int) -> None:
    app.add_middleware(JsonBodyGuard, max_bytes=max_bytes, max_depth=max_depth)
