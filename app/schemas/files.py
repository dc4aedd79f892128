"""Wire objects of the Files API, mirroring OpenAI's FileObject."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from app.schemas.pages import CursorPage, Identified
from app.tables import File, FileStatus


class FileObject(Identified):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: FileStatus
    status_details: str | None = None
    expires_at: int | None = None

    @classmethod
    def of(cls, row: File) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=row.created_at,
            filename=row.filename,
            purpose=row.purpose,
            status=row.status,
            status_details=row.status_details,
        )


class FileList(CursorPage[FileObject]):
    pass


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
