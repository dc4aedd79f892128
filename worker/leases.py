"""Who owns a job, decided in the database.

A worker claims a job by compare-and-set on its row: `status` becomes running, `attempt` goes up by one and
`lease_until` is set. The attempt number is a fencing token: every later write of that worker carries
`WHERE attempt = mine`, so a duplicate delivery, a stale worker or one whose lease expired changes nothing.
The reconciler re-drives what the broker lost: running jobs whose lease expired, queued jobs never picked up.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import session_scope
from app.services import idempotency
from app.services.jobs import add_event, running_jobs
from app.tables import Job, JobCheckpoint, Project, now

log = logging.getLogger("tuneserve.leases")


class LeaseLost(Exception):
    """This worker no longer owns the job (cancelled, re-driven elsewhere, or lease expired): stop writing."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    project_id: str


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fence(session: Session, claim: Claim, settings: Settings, *statuses: str) -> bool:
    """Renew the lease if this claim still owns the job in one of `statuses`. Every worker write starts here,
    in the same transaction, so the row lock (Postgres) or write lock (SQLite) orders it against cancels."""
    result = session.execute(
        update(Job)
        .where(Job.id == claim.job_id, Job.attempt == claim.attempt, Job.status.in_(statuses or ("running",)))
        .values(lease_until=time.time() + settings.job_lease_seconds)
    )
    return result.rowcount == 1


@contextmanager
def fenced_session(factory: sessionmaker[Session], claim: Claim, settings: Settings, *statuses: str):
    """A transaction that commits only if this claim still owns the job; otherwise `LeaseLost`."""
    with session_scope(factory) as session:
        if not fence(session, claim, settings, *statuses):
            raise LeaseLost(claim.job_id)
        yield session


def fail_job(session: Session, job: Job, code: str, message: str, param: str | None = None) -> None:
    job.status, job.finished_at, job.lease_until, job.estimated_finish = "failed", now(), None, None
    job.error = {"code": code, "message": message, "param": param}
    add_event(session, job.id, f"Fine-tuning job failed: {message}", level="error")


def claim_job(factory: sessionmaker[Session], job_id: str, settings: Settings) -> Claim | None:
    """Take the job if it is free to take; None if it is someone else's, finished, or must wait."""
    t = time.time()
    with session_scope(factory) as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        if job is None or job.status not in ("queued", "running"):
            return None
        if job.lease_until is not None and job.lease_until > t:
            return None  # a live worker holds it (running, or still writing a pause checkpoint)
        if job.attempt >= settings.max_job_attempts:
            if _compare_and_set(session, job, status=job.status):
                fail_job(session, job, "max_attempts_exceeded", _gave_up_message(session, job))
            return None
        # Serialise claims within a project so the running-jobs limit holds (a no-op lock on SQLite,
        # which serialises writers anyway).
        session.scalar(select(Project.id).where(Project.id == job.project_id).with_for_update())
        if running_jobs(session, job.project_id) - (job.status == "running") >= settings.max_running_jobs_per_project:
            return None  # stays queued; the reconciler sends it again later
        attempt = job.attempt + 1
        if not _compare_and_set(
            session,
            job,
            status="running",
            attempt=attempt,
            lease_until=t + settings.job_lease_seconds,
            worker=worker_name(),
            estimated_finish=None,
        ):
            return None
        resumed = session.scalar(
            select(JobCheckpoint.step_number)
            .where(JobCheckpoint.job_id == job_id)
            .order_by(JobCheckpoint.step_number.desc())
            .limit(1)
        )
        if resumed:
            add_event(session, job_id, f"Fine-tuning job resumed from step {resumed} (attempt {attempt})")
        else:
            add_event(session, job_id, "Fine-tuning job started")
        return Claim(job_id=job_id, attempt=attempt, project_id=job.project_id)


def _compare_and_set(session: Session, job: Job, **values) -> bool:
    """Update the job only if nobody changed its status or attempt since we read it."""
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.attempt == job.attempt, Job.status == job.status)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:
        session.refresh(job)
        return True
    return False


def _gave_up_message(session: Session, job: Job) -> str:
    step = session.scalar(
        select(JobCheckpoint.step_number)
        .where(JobCheckpoint.job_id == job.id)
        .order_by(JobCheckpoint.step_number.desc())
        .limit(1)
    )
    where = f" The last checkpoint was at step {step}." if step else ""
    return (
        f"The job's worker stopped without finishing {job.attempt} times (lost, killed or out of memory); "
        f"giving up.{where} Check the worker logs, then start a new job."
    )


def reconcile(factory: sessionmaker[Session], dispatcher, settings: Settings) -> dict[str, int]:
    """One pass: re-queue or fail running jobs whose lease expired, re-send jobs left queued, purge old
    idempotency keys. Safe to run from many processes at once: every change is a compare-and-set."""
    t = time.time()
    counts = {"requeued": 0, "failed": 0, "sent": 0}
    with session_scope(factory) as session:
        expired = session.scalars(select(Job).where(Job.status == "running", Job.lease_until < t)).all()
        for job in expired:
            if job.attempt >= settings.max_job_attempts:
                if _compare_and_set(session, job, status="running"):
                    fail_job(session, job, "max_attempts_exceeded", _gave_up_message(session, job))
                    counts["failed"] += 1
            elif _compare_and_set(session, job, status="queued", dispatched_at=None, estimated_finish=None):
                add_event(
                    session,
                    job.id,
                    "The job's worker stopped responding; re-queued to resume from its last checkpoint",
                    level="warn",
                )
                counts["requeued"] += 1
        idempotency.purge_expired(session, settings.idempotency_ttl_seconds)
    with session_scope(factory) as session:
        due = session.scalars(
            select(Job.id).where(
                Job.status == "queued",
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
