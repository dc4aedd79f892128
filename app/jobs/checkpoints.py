"""A job's checkpoints: the newest is where a resumed or re-driven job continues."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.tables import JobCheckpoint


def latest_checkpoint(session: Session, job_id: str) -> JobCheckpoint | None:
    return session.scalar(
        select(JobCheckpoint).where(JobCheckpoint.job_id == job_id).order_by(JobCheckpoint.step_number.desc()).limit(1)
    )
