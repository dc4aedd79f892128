"""Re-driving what the broker lost, from the job rows: running jobs whose lease expired go back to the queue
(or fail, after `max_job_attempts`; or pause, if a pause was asked for), jobs left queued are sent again,
and expired idempotency keys are purged. Run once by the API at start-up and every
`reconcile_interval_seconds` by every worker. Safe from many processes at once: every change is a
compare-and-set."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import rows_matched, session_scope
from app.jobs import transitions
from app.jobs.checkpoints import latest_checkpoint
from app.jobs.status import JobStatus
from app.tables import IdempotencyKey, Job

log = logging.getLogger("tuneserve.reconcile")


class Dispatcher(Protocol):
    def send(self, job_id: str) -> bool: ...


def out_of_attempts(job: Job, settings: Settings) -> bool:
    """Whether the worker just found lost is one too many: the limit counts lost workers, not claims."""
    return job.lost_workers + 1 >= settings.max_job_attempts


def give_up(session: Session, job: Job) -> bool:
    """Fail a job whose workers kept dying without finishing it (the last of them just found lost)."""
    checkpoint = latest_checkpoint(session, job.id)
    where = f" The last checkpoint was at step {checkpoint.step_number}." if checkpoint else ""
    message = (
        f"The job's worker stopped without finishing {job.lost_workers + 1} times (lost, killed or out of memory); "
        f"giving up.{where} Check the worker logs, then start a new job."
    )
    return transitions.fail(session, job, "max_attempts_exceeded", message)


def pause_if_asked(session: Session, job: Job) -> bool:
    """A job whose worker was lost after a pause was asked for is paused at its last checkpoint, as asked,
    rather than trained on."""
    if not job.pause_requested:
        return False
    checkpoint = latest_checkpoint(session, job.id)
    return transitions.settle_pause(session, job, checkpoint.step_number if checkpoint else None)


def purge_expired_idempotency_keys(session: Session, ttl_seconds: float) -> int:
    return rows_matched(session, delete(IdempotencyKey).where(IdempotencyKey.created_at < time.time() - ttl_seconds))


def reconcile(factory: sessionmaker[Session], dispatcher: Dispatcher, settings: Settings) -> dict[str, int]:
    """One pass; returns what it did."""
    t = time.time()
    counts = {"requeued": 0, "paused": 0, "failed": 0, "sent": 0}
    with session_scope(factory) as session:
        expired = session.scalars(select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_until < t)).all()
        for job in expired:
            if pause_if_asked(session, job):
                counts["paused"] += 1
            elif out_of_attempts(job, settings):
                counts["failed"] += give_up(session, job)
            else:
                counts["requeued"] += transitions.requeue(
                    session,
                    job,
                    "The job's worker stopped responding; re-queued to resume from its last checkpoint",
                    worker_lost=True,
                )
        purge_expired_idempotency_keys(session, settings.idempotency_ttl_seconds)
    with session_scope(factory) as session:
        due = session.scalars(
            select(Job.id).where(
                Job.status == JobStatus.QUEUED,
                or_(Job.dispatched_at.is_(None), Job.dispatched_at < t - settings.job_redispatch_seconds),
            )
        ).all()
    for job_id in due:
        if dispatcher.send(job_id):
            with session_scope(factory) as session:
                session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=time.time()))
            counts["sent"] += 1
    if any(counts.values()):
        log.info("reconciled jobs: %s", counts)
    return counts
