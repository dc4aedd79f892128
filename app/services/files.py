"""The Files API's rules: streaming uploads with a byte cap and validation, listing, retrieval, deletion."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app import ids
from app.datasets import StreamingValidator
from app.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from app.jobs.status import TERMINAL
from app.jobs.storage_keys import file_key
from app.services.keys import CurrentProject
from app.services.pagination import Page, keyset_page
from app.storage import Storage
from app.tables import File, Job

UPLOAD_PURPOSES = frozenset({"fine-tune", "batch", "assistants", "vision", "user_data", "evals"})
VALIDATED_PURPOSES = frozenset({"fine-tune"})
MAX_FILENAME_CHARS = 255


def clean_filename(name: str) -> str:
    """The client's name is shown back to it and nothing else, so drop control characters and cap length."""
    cleaned = "".join(ch for ch in name if ch.isprintable())
    return cleaned[:MAX_FILENAME_CHARS] or "upload"


class FileUpload:
    """Receives one file's bytes as they arrive: writes them to storage, hashes them and validates them in the
    same pass, and refuses to grow past the byte cap."""

    def __init__(self, storage: Storage, max_bytes: int):
        self.id = ids.file_id()
        self._writer = storage.writer(file_key(self.id))
        self._max_bytes = max_bytes
        self._sha256 = hashlib.sha256()
        self.validator = StreamingValidator()
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.bytes > self._max_bytes:
            raise PayloadTooLarge(
                f"File is larger than the limit of {self._max_bytes} bytes.",
                param="file",
                code="file_too_large",
            )
        self._sha256.update(data)
        self.validator.feed(data)
        self._writer.write(data)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def commit(self) -> None:
        self._writer.commit()

    def abort(self) -> None:
        self._writer.abort()


def check_purpose(purpose: str | None) -> str:
    if not purpose:
        raise InvalidRequest(
            "Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter"
        )
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"Invalid purpose {purpose!r}; expected one of {', '.join(sorted(UPLOAD_PURPOSES))}.",
            param="purpose",
            code="invalid_value",
        )
    return purpose


def store_upload(
    session: Session,
    storage: Storage,
    project: CurrentProject,
    upload: FileUpload,
    purpose: str,
    filename: str,
) -> File:
    """Validate what was received, then keep it (blob, then row) or throw it away. Nothing partial stays."""
    try:
        report = upload.validator.finish()
        if purpose in VALIDATED_PURPOSES and not report.ok:
            raise InvalidRequest(report.summary(), param="file", code=report.code)
        validated = purpose in VALIDATED_PURPOSES
        row = File(
            id=upload.id,
            project_id=project.id,
            filename=clean_filename(filename),
            purpose=purpose,
            bytes=upload.bytes,
            sha256=upload.sha256,
            status="processed",
            format=report.format if validated else None,
            n_examples=report.n_examples if validated else None,
            stats=report.stats if validated else None,
        )
        upload.commit()
    except BaseException:
        upload.abort()
        raise
    try:
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete(file_key(upload.id))
        raise
    return row


def get_file(session: Session, project: CurrentProject, file_id: str, *, lock: bool = False) -> File:
    """The project's file; `lock` holds its row until commit (job creation and deletion, so neither can slip
    between the other's check and its write)."""
    query = select(File).where(File.id == file_id, File.project_id == project.id)
    if lock:
        query = query.with_for_update()
    # Another project's file is answered exactly like a missing one.
    row = session.scalar(query)
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found")
    return row


def list_files(
    session: Session,
    project: CurrentProject,
    *,
    after: str | None,
    limit: int,
    order: str,
    purpose: str | None,
) -> Page[File]:
    query = select(File).where(File.project_id == project.id)
    if purpose:
        query = query.where(File.purpose == purpose)
    after_seq = get_file(session, project, after).seq if after else None
    return keyset_page(session, query, File.seq, after=after_seq, limit=limit, descending=order == "desc")


def file_content(storage: Storage, row: File) -> Iterator[bytes]:
    return storage.iter_chunks(file_key(row.id))


def delete_file(session: Session, storage: Storage, project: CurrentProject, file_id: str) -> str:
    """Delete a file no unfinished job needs (409 naming the job otherwise: a queued or paused job would fail
    later for want of it). Files of finished jobs may go; the job keeps their ids, as OpenAI's do."""
    row = get_file(session, project, file_id, lock=True)
    user = session.scalar(
        select(Job.id)
        .where(
            Job.project_id == project.id,
            or_(Job.training_file == file_id, Job.validation_file == file_id),
            Job.status.not_in([s.value for s in TERMINAL]),
        )
        .limit(1)
    )
    if user is not None:
        raise Conflict(
            f"File {file_id} is used by fine-tuning job {user}, which has not finished; cancel the job or wait "
            "for it to finish before deleting the file.",
            param="file_id",
            code="file_in_use",
        )
    session.delete(row)
    session.commit()
    # The row goes first: a crash between the two leaves an orphan blob, never a row without its bytes.
    storage.delete(file_key(file_id))
    return file_id
