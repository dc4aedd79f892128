"""The worker's Celery app: the one configuration (app/jobs/broker.py) plus the worker's task module.
It imports no torch; the tasks module does, when a worker loads it."""

from __future__ import annotations

from app.config import get_settings
from app.jobs.broker import make_celery

celery_app = make_celery(get_settings(), include=["worker.tasks"])
