"""The web dashboard at `/` and `/ui/...` and the API docs at `/docs`, from files that ship with the package
(app/dashboard/). The dashboard is static: it calls the public /v1 API with the key its user pastes, so it can
never see more than that key can; every path under /ui/ that is not a file answers its page, and the script
routes it."""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
from dataclasses import dataclass
from functools import cache

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from app.api.compression import maybe_gzipped
from app.dashboard import STATIC_DIR
from app.errors import NotFound

router = APIRouter(include_in_schema=False)
ASSETS = "/ui/static"


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    media_type: str
    etag: str


# The files there are, listed once: a request names one of them or nothing (no path is ever built from it), and
# what is read and compressed per process is bounded by this list.
FILES = frozenset(p.relative_to(STATIC_DIR).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file())


@cache
def _asset(relative: str) -> Asset:
    """A file of FILES, read and compressed once per process."""
    path = STATIC_DIR / relative
    body = path.read_bytes()
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if media_type.startswith("text/") or media_type == "application/javascript":
        media_type += "; charset=utf-8"
    return Asset(body, gzip.compress(body, compresslevel=9), media_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


def _serve(request: Request, relative: str) -> Response:
    if relative not in FILES:
        raise NotFound(f"No file {relative[:200]} in the dashboard.", code="not_found")
    asset = _asset(relative)
    # Revalidated on every load (a deploy changes them), answered 304 when unchanged.
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return maybe_gzipped(request, asset.body, asset.media_type, headers, compressed=asset.gzipped)


@router.get(f"{ASSETS}/{{path:path}}")
def static_file(request: Request, path: str) -> Response:
    return _serve(request, path)


@router.get("/")
@router.get("/ui")
@router.get("/ui/{page:path}")
def page(request: Request) -> Response:
    return _serve(request, "index.html")


@router.get("/docs")
def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="tuneserve API",
        swagger_js_url=f"{ASSETS}/vendor/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS}/vendor/swagger-ui.css",
        swagger_favicon_url="data:,",
        # No badge from validator.swagger.io: the docs make no request outside the service.
        swagger_ui_parameters={"validatorUrl": None},
    )
