"""Job events: the job's log as clients read it (`GET .../events`), written in the transaction of the change."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app import ids
from app.tables import EventLevel, EventType, JobEvent


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: EventLevel = "info",
    type: EventType = "message",
    data: dict[str, Any] | None = None,
) -> None:
    session.add(JobEvent(id=ids.event_id(), job_id=job_id, level=level, type=type, message=message, data=data))
