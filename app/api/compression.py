"""gzip for the answers worth it (the dashboard's scripts and a job's metric series), for clients that accept it.
Not a middleware: streamed answers (server-sent events) must reach the client as they are written."""

from __future__ import annotations

import gzip

from fastapi import Request
from fastapi.responses import Response

MIN_BYTES = 1024  # below this gzip's header costs more than it saves


def _accepts_gzip(request: Request) -> bool:
    return "gzip" in request.headers.get("accept-encoding", "").lower()


def maybe_gzipped(
    request: Request,
    body: bytes,
    media_type: str,
    headers: dict[str, str] | None = None,
    compressed: bytes | None = None,
) -> Response:
    """`body` as it is, or gzipped (`compressed`, when the caller keeps it, else compressed now)."""
    headers = {"Vary": "Accept-Encoding", **(headers or {})}
    if len(body) < MIN_BYTES or not _accepts_gzip(request):
        return Response(body, media_type=media_type, headers=headers)
    data = compressed if compressed is not None else gzip.compress(body, compresslevel=6)
    return Response(data, media_type=media_type, headers={**headers, "Content-Encoding": "gzip"})
