"""The Celery application. It imports no torch: the API process imports it to send tasks.

The broker is only a doorbell; the database decides who owns a job (see reliability notes in docs).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings

TRAINING_QUEUE = "training"


def make_celery(settings: Settings) -> Celery:
    app = Celery("tuneserve", broker=settings.broker_url_resolved, include=[])
    app.conf.update(
        task_queues=[Queue(TRAINING_QUEUE)],
        task_default_queue=TRAINING_QUEUE,
        task_create_missing_queues=False,
        # One long task per worker process, taken only when the process is free.
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


celery_app = make_celery(get_settings())
