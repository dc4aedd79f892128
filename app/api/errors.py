"""The one mapping from errors to OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.api.request_id import current_request_id
from app.errors import InvalidRequest, NotFound, ServiceUnavailable, TuneserveError
from app.storage import StorageUnavailable

log = logging.getLogger("tuneserve.api")
# What proxies log for a request its client abandoned; never seen by that client.
CLIENT_CLOSED_REQUEST = 499

# Where a request field came from is not part of its name as a client knows it.
_LOCATIONS = {"body", "query", "path", "header", "cookie"}
# Error types that schemas raise themselves (as PydanticCustomError) and that are the envelope's code as they are.
SCHEMA_ERROR_CODES = {"unsupported_parameter"}


def error_response(error: TuneserveError) -> JSONResponse:
    headers = error.headers()
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.envelope(), status_code=error.status, headers=headers or None)


def database_overloaded() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The server is busy: no database connection came free in time. Retry shortly.", code="database_busy"
    )


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in _LOCATIONS]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if first.get("type") in SCHEMA_ERROR_CODES:  # raised by a schema on purpose, with a message for the client
        return InvalidRequest(f"{first.get('msg')}.", param=param, code=first["type"])
    return InvalidRequest(f"Invalid value for '{param}': {first.get('msg')}.", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TuneserveError)
    async def _domain(_request: Request, exc: TuneserveError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error: TuneserveError
        if exc.status_code == 404:
            error = NotFound(f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
        else:
            error = TuneserveError(str(exc.detail), code=None)
            error.status = exc.status_code
            error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(error)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, _exc: ClientDisconnect) -> Response:
        # Not a server error: the client went away mid-body (an upload it abandoned). Whatever the request had
        # started is already undone; nobody is left to read an answer.
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(StorageUnavailable)
    async def _storage_unavailable(_request: Request, exc: StorageUnavailable) -> JSONResponse:
        log.warning("blob storage unavailable: %s", exc)
        error = ServiceUnavailable("Blob storage is not answering. Retry shortly.", code="storage_unavailable")
        return error_response(error)

    @app.exception_handler(PoolTimeout)
    async def _pool_exhausted(_request: Request, _exc: PoolTimeout) -> JSONResponse:
        # Overload, not a fault: every connection is in use. The client may retry; nothing was done.
        return error_response(database_overloaded())

    @app.exception_handler(DataError)
    async def _unrepresentable(_request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value from the request (Postgres text cannot hold a NUL byte, say): the
        # request is at fault, and nothing was changed.
        return error_response(
            InvalidRequest("A value in the request cannot be stored or searched for.", code="invalid_value")
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception(
            "unhandled error on %s %s (request_id=%s)", request.method, request.url.path, current_request_id.get()
        )
        error = TuneserveError("The server had an error while processing your request.")
        error.status, error.type = 500, "server_error"
        return error_response(error)
