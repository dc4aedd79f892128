"""Streaming multipart/form-data for uploads.

Starlette's own form parser spools every file to disk with no total cap before the handler runs. Here the
body is parsed as it arrives and the file part goes straight into a `FileUpload` (storage + hash + validation,
one pass), so memory stays flat and the byte cap holds for chunked bodies without a Content-Length too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from anyio import CancelScope, to_thread
from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import InvalidRequest, PayloadTooLarge
from app.services.files import FileUpload

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

FORM_OVERHEAD_BYTES = 1024 * 1024  # room for the other fields and part headers around the file
MAX_FIELD_BYTES = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024  # long client filenames are harmless metadata, so allow them
BATCH_BYTES = 1024 * 1024  # parse in batches off the event loop; one thread hop per MiB


@dataclass
class ReceivedForm:
    upload: FileUpload
    filename: str
    fields: dict[str, str] = field(default_factory=dict)


class _FormState:
    """Callbacks for python-multipart's parser; runs in a worker thread."""

    def __init__(self, file_field: str, open_upload: Callable[[], FileUpload]):
        self.file_field = file_field
        self.open_upload = open_upload
        self.upload: FileUpload | None = None
        self.filename = ""
        self.fields: dict[str, str] = {}
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._field_name: str | None = None
        self._field_value = bytearray()
        self._file: FileUpload | None = None  # the upload the current part's data goes to, if it is the file

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._field_name = None
        self._field_value = bytearray()
        self._file = None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("latin-1")
        if b"filename" in options:
            if name != self.file_field:
                raise InvalidRequest(f"Unexpected file field {name!r}; send the file as 'file'.", param="file")
            if self.upload is not None:
                raise InvalidRequest("Send exactly one file per upload.", param="file")
            raw = options[b"filename"]
            try:
                self.filename = raw.decode("utf-8")
            except UnicodeDecodeError:
                self.filename = raw.decode("latin-1")
            self.upload = self._file = self.open_upload()
        else:
            self._field_name = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
            return
        self._field_value += data[start:end]
        if len(self._field_value) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"Form field {self._field_name!r} is too long.", param=self._field_name)

    def _part_end(self) -> None:
        if self._field_name is not None:
            self.fields[self._field_name] = self._field_value.decode("utf-8", errors="replace")
        self._file = None


async def abort_upload(upload: FileUpload) -> None:
    """Throw an upload away off the event loop (object storage answers over the network), and to the end even
    when the request is being cancelled (a client that left)."""
    with CancelScope(shield=True):
        await to_thread.run_sync(upload.abort)


async def receive_upload(
    request: Request, *, max_file_bytes: int, open_upload: Callable[[], FileUpload], file_field: str = "file"
) -> ReceivedForm:
    """Parse a multipart body with one file part; the caller must commit or abort the returned upload."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise InvalidRequest("Uploads must be multipart/form-data with a 'file' part.", param="file")
    max_body = max_file_bytes + FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise PayloadTooLarge(
            f"File is larger than the limit of {max_file_bytes} bytes.", param="file", code="file_too_large"
        )

    state = _FormState(file_field, open_upload)
    parser = MultipartParser(options[b"boundary"], state.callbacks(), max_header_size=MAX_HEADER_BYTES)
    received = 0
    batch: list[bytes] = []
    batch_bytes = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body:
                raise PayloadTooLarge(
                    f"File is larger than the limit of {max_file_bytes} bytes.",
                    param="file",
                    code="file_too_large",
                )
            batch.append(chunk)
            batch_bytes += len(chunk)
            if batch_bytes >= BATCH_BYTES:
                await to_thread.run_sync(parser.write, b"".join(batch))
                batch, batch_bytes = [], 0
        if batch:
            await to_thread.run_sync(parser.write, b"".join(batch))
        parser.finalize()
    except BaseException as exc:
        # Disconnects, caps, bad input or a full disk: whatever stops the upload, nothing of it stays.
        if state.upload:
            await abort_upload(state.upload)
        if isinstance(exc, MultipartParseError):
            raise InvalidRequest(f"Malformed multipart body: {exc}", param="file") from exc
        raise
    if state.upload is None:
        raise InvalidRequest("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
    return ReceivedForm(upload=state.upload, filename=state.filename, fields=state.fields)
