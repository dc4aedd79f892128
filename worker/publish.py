"""Publishing a finished job, fenced and atomic: blobs first under names unique to this attempt, then one
transaction that re-checks ownership and writes the final model's row, the result files and `succeeded`
together. A stale worker's publish fails the fence and leaves nothing behind. (Checkpoint models were published
as each checkpoint was written: worker/runner.py.)"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select

from app import ids
from app.jobs import transitions
from app.jobs.storage_keys import adapter_key, file_key
from app.tables import File, FineTunedModel, Project
from worker.context import WorkerContext
from worker.evaluation_report import REPORT_FILENAME
from worker.leases import Claim, claimed_job, fenced_session
from worker.training.loop import TrainingResult

# The job's result files: the metrics of every step (OpenAI's file), every training row's final loss, and (with a
# validation file) the evaluation report, REPORT_FILENAME.
METRICS_FILENAME = "step_metrics.csv"
EXAMPLES_FILENAME = "example_losses.jsonl"


def result_files(result: TrainingResult, evaluation: dict[str, Any] | None) -> list[tuple[str, bytes]]:
    files = [(METRICS_FILENAME, result.metrics_csv().encode())]
    if result.example_scores:
        lines = (json.dumps(score.to_dict()) + "\n" for score in result.example_scores)
        files.append((EXAMPLES_FILENAME, "".join(lines).encode()))
    if evaluation is not None:
        files.append((REPORT_FILENAME, json.dumps(evaluation, indent=1).encode()))
    return files


def publish(ctx: WorkerContext, claim: Claim, result: TrainingResult, evaluation: dict[str, Any] | None = None) -> str:
    """`evaluation`: the evaluation report (worker/evaluation_report.py), a result file whose summary the job
    keeps."""
    if result.adapter_dir is None:
        raise ValueError(f"job {claim.job_id}: the run stopped ({result.stopped}) before it had an adapter to publish")
    storage = ctx.storage
    files = [(ids.file_id(), name, content) for name, content in result_files(result, evaluation)]
    adapter = adapter_key(claim.job_id, claim.attempt)
    storage.put_dir(adapter, result.adapter_dir)
    for file_id, _, content in files:
        writer = storage.writer(file_key(file_id))
        writer.write(content)
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
            for file_id, name, content in files:
                session.add(
                    File(
                        id=file_id,
                        project_id=job.project_id,
                        filename=name,
                        purpose="fine-tune-results",
                        bytes=len(content),
                        sha256=hashlib.sha256(content).hexdigest(),
                        status="processed",
                    )
                )
            # The fence above holds the row, so the move cannot lose.
            transitions.succeed(
                session,
                job,
                model=model,
                trained_tokens=result.trained_tokens,
                result_files=[f[0] for f in files],
                evaluation=evaluation["summary"] if evaluation else None,
            )
    except BaseException:
        storage.delete(adapter)
        for file_id, _, _ in files:
            storage.delete(file_key(file_id))
        raise
    return model
