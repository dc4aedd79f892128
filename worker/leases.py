"""Who owns a job, decided in the database.

A worker claims a job by compare-and-set on its row (`app/jobs/transitions.py` `claim`): `status` becomes
running, `attempt` goes up by one and `lease_until` is set. The attempt number is a fencing token: every later
write of that worker runs in a `fenced_session`, which first renews the lease `WHERE attempt = mine AND status
= running`, so a duplicate delivery, a stale worker or one whose lease expired changes nothing.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import rows_matched, session_scope
from app.jobs import transitions
from app.jobs.checkpoints import latest_checkpoint
from app.jobs.reconcile import give_up, out_of_attempts, pause_if_asked
from app.jobs.status import JobStatus
from app.tables import Job, Project


class LeaseLost(Exception):
    """This worker no longer owns the job (cancelled, re-driven elsewhere, or lease expired): stop writing."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    project_id: str


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fence(session: Session, claim: Claim, settings: Settings) -> bool:
    """Renew the lease if this claim still owns the running job. Every worker write starts here, in the same
    transaction, so the row lock (Postgres) or write lock (SQLite) orders it against cancels."""
    renewed = rows_matched(
        session,
        update(Job)
        .where(Job.id == claim.job_id, Job.attempt == claim.attempt, Job.status == JobStatus.RUNNING)
        .values(lease_until=time.time() + settings.job_lease_seconds),
    )
    return renewed == 1


@contextmanager
def fenced_session(factory: sessionmaker[Session], claim: Claim, settings: Settings) -> Iterator[Session]:
    """A transaction that commits only if this claim still owns the job; otherwise `LeaseLost`."""
    with session_scope(factory) as session:
        if not fence(session, claim, settings):
            raise LeaseLost(claim.job_id)
        yield session


def claimed_job(session: Session, claim: Claim) -> Job:
    """The claimed job's row (it exists: a claim is only ever made on a row, and rows of claimed jobs stay)."""
    return session.scalars(select(Job).where(Job.id == claim.job_id)).one()


def running_jobs(session: Session, project_id: str) -> int:
    query = select(func.count()).where(Job.project_id == project_id, Job.status == JobStatus.RUNNING)
    return session.execute(query).scalar_one()


def claim_job(factory: sessionmaker[Session], job_id: str, settings: Settings) -> Claim | None:
    """Take the job if it is free to take; None if it is someone else's, finished, or must wait."""
    with session_scope(factory) as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        if job is None or job.status not in transitions.LEGAL["claim"][0]:
            return None
        if job.lease_until is not None and job.lease_until > time.time():
            return None  # a live worker holds it
        if pause_if_asked(session, job):
            return None  # its worker was lost after a pause was asked for: paused, not trained on
        if job.status == JobStatus.RUNNING and out_of_attempts(job, settings):
            give_up(session, job)  # its lease expired: the worker just found lost was one too many
            return None
        # Serialise claims within a project so the running-jobs limit holds (a no-op lock on SQLite,
        # which serialises writers anyway).
        session.scalar(select(Project.id).where(Project.id == job.project_id).with_for_update())
        already_running = job.status == JobStatus.RUNNING
        if running_jobs(session, job.project_id) - already_running >= settings.max_running_jobs_per_project:
            return None  # stays queued; the reconciler sends it again later
        checkpoint = latest_checkpoint(session, job_id)
        resumed_from = checkpoint.step_number if checkpoint else None
        if not transitions.claim(
            session, job, lease_seconds=settings.job_lease_seconds, worker=worker_name(), resumed_from=resumed_from
        ):
            return None
        return Claim(job_id=job_id, attempt=job.attempt, project_id=job.project_id)
