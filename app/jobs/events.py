"""Job events: the job's log as clients read it (`GET .../events`), written in the transaction of the change."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app import ids
from app.tables import JobEvent


def add_event(session: Session, job_id: str, message: str, *, level: str = "info", type: str = "message", data=None):
    session.add(JobEvent(id=ids.event_id(), job_id=job_id, level=level, type=type, message=message, data=data))
