"""/v1/fine_tuning/jobs: OpenAI's fine-tuning jobs API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from app.api.deps import JobCommandsDep, ProjectDep, RegistryDep, SessionDep
from app.schemas.errors import ERROR_RESPONSES
from app.schemas.jobs import (
    CheckpointList,
    CheckpointObject,
    CreateJobRequest,
    FineTuningJob,
    JobEventList,
    JobEventObject,
    JobList,
    job_object,
)
from app.schemas.pages import cursor_page
from app.services import jobs

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=ERROR_RESPONSES)

Limit = Annotated[int, Query(ge=1, le=1000)]


def _answer(result: tuple[int, dict]) -> JSONResponse:
    status, body = result
    return JSONResponse(body, status_code=status)


@router.post("", response_model=FineTuningJob)
def create_fine_tuning_job(body: CreateJobRequest, commands: JobCommandsDep, registry: RegistryDep):
    return _answer(commands.create(body, registry))


@router.get("", response_model=JobList)
def list_fine_tuning_jobs(
    request: Request, project: ProjectDep, session: SessionDep, after: str | None = None, limit: Limit = 20
) -> JobList:
    # `metadata[key]=value` filters, as the OpenAI API takes them.
    metadata = {
        k[len("metadata[") : -1]: v
        for k, v in request.query_params.items()
        if k.startswith("metadata[") and k.endswith("]")
    }
    page = jobs.list_jobs(session, project, after=after, limit=limit, metadata=metadata)
    return JobList(data=[job_object(j, project.id) for j in page.data], has_more=page.has_more)


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob)
def retrieve_fine_tuning_job(fine_tuning_job_id: str, project: ProjectDep, session: SessionDep) -> FineTuningJob:
    return job_object(jobs.get_job(session, project, fine_tuning_job_id), project.id)


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
def cancel_fine_tuning_job(fine_tuning_job_id: str, commands: JobCommandsDep):
    return _answer(commands.act(fine_tuning_job_id, "cancel"))


@router.post("/{fine_tuning_job_id}/pause", response_model=FineTuningJob)
def pause_fine_tuning_job(fine_tuning_job_id: str, commands: JobCommandsDep):
    return _answer(commands.act(fine_tuning_job_id, "pause"))


@router.post("/{fine_tuning_job_id}/resume", response_model=FineTuningJob)
def resume_fine_tuning_job(fine_tuning_job_id: str, commands: JobCommandsDep):
    return _answer(commands.act(fine_tuning_job_id, "resume"))


@router.get("/{fine_tuning_job_id}/events", response_model=JobEventList)
def list_fine_tuning_events(
    fine_tuning_job_id: str, project: ProjectDep, session: SessionDep, after: str | None = None, limit: Limit = 20
) -> JobEventList:
    page = jobs.list_events(session, project, fine_tuning_job_id, after=after, limit=limit)
    return JobEventList(data=[JobEventObject.of(e) for e in page.data], has_more=page.has_more)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=CheckpointList)
def list_fine_tuning_checkpoints(
    fine_tuning_job_id: str, project: ProjectDep, session: SessionDep, after: str | None = None, limit: Limit = 10
) -> CheckpointList:
    page = jobs.list_checkpoints(session, project, fine_tuning_job_id, after=after, limit=limit)
    return CheckpointList(**cursor_page([CheckpointObject.of(c) for c in page.data], page.has_more))
