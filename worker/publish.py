"""Publishing a finished job, fenced and atomic: blobs first under names unique to this attempt, then one
transaction that re-checks ownership and writes the model rows, the result file and `succeeded` together.
A stale worker's publish fails the fence and leaves nothing behind."""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from app import ids
from app.services.files import storage_key as file_storage_key
from app.services.jobs import add_event
from app.tables import File, FineTunedModel, Job, JobCheckpoint, Project, now
from worker.context import WorkerContext
from worker.leases import Claim, fenced_session
from worker.training.loop import TrainingResult

RESULT_FILENAME = "step_metrics.csv"


def adapter_key(claim: Claim) -> str:
    return f"models/{claim.job_id}/attempt-{claim.attempt}"


def publish(ctx: WorkerContext, claim: Claim, result: TrainingResult) -> str:
    storage = ctx.storage
    csv = result.metrics_csv().encode()
    result_file_id = ids.file_id()
    storage.put_dir(adapter_key(claim), result.adapter_dir)
    writer = storage.writer(file_storage_key(result_file_id))
    writer.write(csv)
    writer.commit()
    try:
        with fenced_session(ctx.sessionmaker, claim, ctx.settings, "running") as session:
            job = session.scalar(select(Job).where(Job.id == claim.job_id))
            project = session.scalar(select(Project.name).where(Project.id == job.project_id))
            model = ids.fine_tuned_model_name(job.base_model, project, job.suffix, job.id)
            session.add(
                FineTunedModel(
                    id=model,
                    project_id=job.project_id,
                    job_id=job.id,
                    base_model=job.base_model,
                    storage_key=adapter_key(claim),
                )
            )
            for checkpoint in session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job.id)):
                session.add(
                    FineTunedModel(
                        id=checkpoint.fine_tuned_model_checkpoint,
                        project_id=job.project_id,
                        job_id=job.id,
                        base_model=job.base_model,
                        step_number=checkpoint.step_number,
                        storage_key=checkpoint.storage_key,
                    )
                )
            session.add(
                File(
                    id=result_file_id,
                    project_id=job.project_id,
                    filename=RESULT_FILENAME,
                    purpose="fine-tune-results",
                    bytes=len(csv),
                    sha256=hashlib.sha256(csv).hexdigest(),
                    status="processed",
                )
            )
            job.status, job.finished_at, job.fine_tuned_model = "succeeded", now(), model
            job.trained_tokens, job.result_files = result.trained_tokens, [result_file_id]
            job.lease_until = job.estimated_finish = None
            add_event(session, job.id, f"New fine-tuned model created: {model}", data={"model": model})
            add_event(session, job.id, "The job has successfully completed")
    except BaseException:
        storage.delete(adapter_key(claim))
        storage.delete(file_storage_key(result_file_id))
        raise
    return model
