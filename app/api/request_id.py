"""An `x-request-id` on every response and in the access log line of its request.

The openai SDK reads this header as `request_id` on its responses, so a client can quote the id of a failed call
and the operator can find that request in the server log.
"""

from __future__ import annotations

import copy
import logging
import uuid
from contextvars import ContextVar

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
MAX_CLIENT_ID_LENGTH = 128

# The id of the request being handled, for log records emitted while it is (uvicorn's access line among them).
current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)


def _is_sane(value: str) -> bool:
    # Visible ASCII only: the id is echoed in a header and written into log lines, where a space, a control
    # character or a megabyte of text would let a client forge or flood them.
    return 0 < len(value) <= MAX_CLIENT_ID_LENGTH and all("!" <= ch <= "~" for ch in value)


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _is_sane(text) else None
    return None


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


class RequestIdMiddleware:
    """Pure ASGI, so streamed (SSE) bodies pass through chunk by chunk instead of being buffered."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _client_request_id(scope) or new_request_id()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        token = current_request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)


def install_request_ids(app: FastAPI) -> None:
    """Wrap the whole app, outside Starlette's ServerErrorMiddleware.

    `app.add_middleware` would put this inside ServerErrorMiddleware, whose 500 answer to an unhandled exception
    is sent straight to the server and would leave without the header: exactly the response a client most needs
    an id for.
    """
    build_stack = app.build_middleware_stack
    # Replacing the method on this one instance is the point; mypy refuses any assignment to a method.
    app.build_middleware_stack = lambda: RequestIdMiddleware(build_stack())  # type: ignore[method-assign]


class RequestIdLogFilter(logging.Filter):
    """Gives every record a `request_id` attribute ("-" outside a request) for log formats to use."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or "-"
        return True


def uvicorn_log_config() -> dict:
    """uvicorn's own logging configuration, with the request id at the end of each access line."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["request_id"] = {"()": RequestIdLogFilter}
    config["handlers"]["access"].setdefault("filters", []).append("request_id")
    access = config["formatters"]["access"]
    access["fmt"] = access["fmt"] + " request_id=%(request_id)s"
    return config
