"""Domain errors. Services raise these; `app.api.errors` maps them to OpenAI's error envelope."""

from __future__ import annotations


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
