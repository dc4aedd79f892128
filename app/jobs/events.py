"""Job events: the job's log as clients read it (`GET .../events`), written in the transaction of the change."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app import ids
from app.tables import EventLevel, EventType, JobEvent

# What a metrics event's `data` and a checkpoint's `metrics` may hold (over supervised tokens; DPO's over pairs),
# besides `step` (and `total_steps` in events). GET .../metrics serves them as columns.
METRIC_NAMES = (
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
    # DPO's (worker/training/dpo.py)
    "train_reward_accuracy",
    "valid_reward_accuracy",
    "full_valid_reward_accuracy",
    "reward_margin",
    "rewards_chosen",
    "rewards_rejected",
)


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
