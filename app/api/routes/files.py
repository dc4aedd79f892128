"""/v1/files: OpenAI's Files API."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import ProjectDep, SessionDep, SettingsDep, StorageDep, release_connection
from app.api.uploads import abort_upload, receive_upload
from app.schemas.errors import ERROR_RESPONSES
from app.schemas.files import FileDeleted, FileList, FileObject
from app.services import files
from app.services.files import FileUpload

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES)

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": sorted(files.UPLOAD_PURPOSES)},
                    },
                }
            }
        },
    }
}


@router.post("", response_model=FileObject, openapi_extra=_UPLOAD_BODY)
async def create_file(
    request: Request, project: ProjectDep, session: SessionDep, settings: SettingsDep, storage: StorageDep
) -> FileObject:
    form = await receive_upload(
        request,
        max_file_bytes=settings.max_upload_bytes,
        open_upload=lambda: FileUpload(storage, settings.max_upload_bytes),
    )
    try:
        purpose = files.check_purpose(form.fields.get("purpose"))
    except BaseException:
        await abort_upload(form.upload)
        raise
    row = await run_in_threadpool(files.store_upload, session, storage, project, form.upload, purpose, form.filename)
    return FileObject.of(row)


@router.get("", response_model=FileList)
def list_files(
    project: ProjectDep,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> FileList:
    page = files.list_files(session, project, after=after, limit=limit, order=order, purpose=purpose)
    return FileList.of(page, FileObject.of)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, project: ProjectDep, session: SessionDep) -> FileObject:
    return FileObject.of(files.get_file(session, project, file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def retrieve_file_content(
    file_id: str, project: ProjectDep, session: SessionDep, storage: StorageDep
) -> StreamingResponse:
    row = files.get_file(session, project, file_id)
    release_connection(session)  # the body streams for as long as the client takes
    return StreamingResponse(
        files.file_content(storage, row),
        media_type="application/octet-stream",
        headers={"Content-Length": str(row.bytes)},
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, project: ProjectDep, session: SessionDep, storage: StorageDep) -> FileDeleted:
    return FileDeleted(id=files.delete_file(session, storage, project, file_id))
