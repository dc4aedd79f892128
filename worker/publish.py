"""Publishing a finished job, fenced and atomic: blobs first under names unique to this attempt, then one
transaction that re-checks ownership and writes the final model's row, the result file and `succeeded`
together. A stale worker's publish fails the fence and leaves nothing behind. (Checkpoint models were published
as each checkpoint was written: worker/runner.py.)"""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from app import ids
from app.jobs import transitions
from app.jobs.storage_keys import adapter_key, file_key
from app.tables import File, FineTunedModel, Project
from worker.context import WorkerContext
from worker.leases import Claim, claimed_job, fenced_session
from worker.training.loop import TrainingResult

RESULT_FILENAME = "step_metrics.csv"


def publish(ctx: WorkerContext, claim: Claim, result: TrainingResult) -> str:
    if result.adapter_dir is None:
        raise ValueError(f"job {claim.job_id}: the run stopped ({result.stopped}) before it had an adapter to publish")
    storage = ctx.storage
    csv = result.metrics_csv().encode()
    result_file_id = ids.file_id()
    adapter = adapter_key(claim.job_id, claim.attempt)
    storage.put_dir(adapter, result.adapter_dir)
    writer = storage.writer(file_key(result_file_id))
    writer.write(csv)
    writer.commit()
    try:
        with fenced_session(ctx.sessionmaker, claim, ctx.settings) as session:
            job = claimed_job(session, claim)
            project = session.scalars(select(Project.name).where(Project.id == job.project_id)).one()
            model = ids.fine_tuned_model_name(job.base_model, project, job.suffix, job.id)
            session.add(
                FineTunedModel(
                    id=model,
                    project_id=job.project_id,
                    job_id=job.id,
                    base_model=job.base_model,
                    storage_key=adapter,
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
            # The fence above holds the row, so the move cannot lose.
            transitions.succeed(
                session, job, model=model, trained_tokens=result.trained_tokens, result_files=[result_file_id]
            )
    except BaseException:
        storage.delete(adapter)
        storage.delete(file_key(result_file_id))
        raise
    return model
