"""Domain errors. Services raise these; `app.api.errors` maps them to OpenAI's error envelope."""

from __future__ import annotations

import math


class TuneserveError(Exception):
    """Base of every error a client may see. `status` is the HTTP status the API answers with."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """Response headers this error carries (Retry-After, rate-limit state)."""
        return {}


class InvalidRequest(TuneserveError):
    status = 400


class AuthenticationFailed(TuneserveError):
    status = 401
    type = "authentication_error"


class NotFound(TuneserveError):
    status = 404


class PayloadTooLarge(TuneserveError):
    status = 413


class Unprocessable(TuneserveError):
    status = 422


class Conflict(TuneserveError):
    status = 409


class ServiceUnavailable(TuneserveError):
    """Temporarily unable to answer; `retry_after` (seconds) becomes the Retry-After header."""

    status = 503
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, retry_after: int = 1):
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimited(TuneserveError):
    """A project's request or token rate is used up: 429 with Retry-After and OpenAI's x-ratelimit-* headers."""

    status = 429

    def __init__(self, message: str, *, kind: str, retry_after: float, rate_headers: dict[str, str]):
        super().__init__(message, code="rate_limit_exceeded")
        self.type = kind  # "requests" or "tokens", as OpenAI's 429s say which limit was hit
        self.retry_after = retry_after
        self.rate_headers = rate_headers

    def headers(self) -> dict[str, str]:
        # Whole seconds, rounded up: a client that waits exactly this long finds room.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after))), **self.rate_headers}
