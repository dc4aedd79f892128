"""/v1/fine_tuning/jobs: OpenAI's fine-tuning jobs API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from app.api.compression import maybe_gzipped
from app.api.deps import DispatcherDep, ProjectDep, RegistryDep, SessionDep, SettingsDep, StorageDep
from app.api.idempotency import IdempotencyDep
from app.schemas.errors import ERROR_RESPONSES
from app.schemas.jobs import (
    CheckpointList,
    CheckpointObject,
    CreateJobRequest,
    FineTuningJob,
    JobEventList,
    JobEventObject,
    JobList,
    JobMetrics,
    job_object,
)
from app.services import jobs

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=ERROR_RESPONSES)

Limit = Annotated[int, Query(ge=1, le=1000)]


# The routes that change a job take an Idempotency-Key (IdempotencyDep), commit the change with their answer,
# and only then wake a worker, so a task never names a job that is not in the database.


@router.post("", response_model=FineTuningJob)
def create_fine_tuning_job(
    body: CreateJobRequest,
    session: SessionDep,
    project: ProjectDep,
    registry: RegistryDep,
    storage: StorageDep,
    settings: SettingsDep,
    once: IdempotencyDep,
    dispatcher: DispatcherDep,
) -> FineTuningJob:
    job = jobs.create_job(session, project, registry, storage, body, max_lora_rank=settings.max_lora_rank)
    answer = once.commit(session, job_object(job, project.id))
    jobs.wake_worker(dispatcher, job)
    return answer


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
    return JobList.of(page, lambda job: job_object(job, project.id))


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob)
def retrieve_fine_tuning_job(fine_tuning_job_id: str, project: ProjectDep, session: SessionDep) -> FineTuningJob:
    return job_object(jobs.get_job(session, project, fine_tuning_job_id), project.id)


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
def cancel_fine_tuning_job(
    fine_tuning_job_id: str, session: SessionDep, project: ProjectDep, once: IdempotencyDep
) -> FineTuningJob:
    job = jobs.cancel_job(session, project, fine_tuning_job_id)
    return once.commit(session, job_object(job, project.id))


@router.post("/{fine_tuning_job_id}/pause", response_model=FineTuningJob)
def pause_fine_tuning_job(
    fine_tuning_job_id: str, session: SessionDep, project: ProjectDep, once: IdempotencyDep
) -> FineTuningJob:
    job = jobs.pause_job(session, project, fine_tuning_job_id)
    return once.commit(session, job_object(job, project.id))


@router.post("/{fine_tuning_job_id}/resume", response_model=FineTuningJob)
def resume_fine_tuning_job(
    fine_tuning_job_id: str, session: SessionDep, project: ProjectDep, once: IdempotencyDep, dispatcher: DispatcherDep
) -> FineTuningJob:
    job = jobs.resume_job(session, project, fine_tuning_job_id)
    answer = once.commit(session, job_object(job, project.id))
    jobs.wake_worker(dispatcher, job)
    return answer


@router.get("/{fine_tuning_job_id}/events", response_model=JobEventList)
def list_fine_tuning_events(
    fine_tuning_job_id: str, project: ProjectDep, session: SessionDep, after: str | None = None, limit: Limit = 20
) -> JobEventList:
    page = jobs.list_events(session, project, fine_tuning_job_id, after=after, limit=limit)
    return JobEventList.of(page, JobEventObject.of)


@router.get("/{fine_tuning_job_id}/metrics", response_model=JobMetrics)
def fine_tuning_metrics(
    request: Request,
    fine_tuning_job_id: str,
    project: ProjectDep,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 100_000,
) -> Response:
    """The job's metric events after the event `after` as columns, gzipped when the client accepts it: the
    dashboard's charts load 10,000 steps in one answer of about 100 KB."""
    columns, last_id, has_more = jobs.job_metrics(session, project, fine_tuning_job_id, after=after, limit=limit)
    body = JobMetrics(data=columns, last_id=last_id, has_more=has_more).model_dump_json().encode()
    return maybe_gzipped(request, body, "application/json")


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=CheckpointList)
def list_fine_tuning_checkpoints(
    fine_tuning_job_id: str, project: ProjectDep, session: SessionDep, after: str | None = None, limit: Limit = 10
) -> CheckpointList:
    page = jobs.list_checkpoints(session, project, fine_tuning_job_id, after=after, limit=limit)
    return CheckpointList.of(page, CheckpointObject.of)
