"""The Celery application. It imports no torch: the API builds one to send tasks.

Delivery choices (see docs/jobs.md): the database, not the broker, decides who runs a job. A worker claims a
job by compare-and-set on its row (attempt + lease) and renews the lease every heartbeat, so a second copy of
a message (Redis redelivers unacked messages after the visibility timeout) finds the job owned and does
nothing; a lost message (a flushed Redis, a worker killed before acking) is re-sent by the reconciler from
the job rows. Hence: late acks with prefetch 1 (a busy worker never holds a second job back from an idle
one), no requeue of a killed worker's message (the reconciler re-drives it with an attempt limit instead of a
poison loop), and a long visibility timeout, since redelivery is only a safety net.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings

TRAINING_QUEUE = "training"
VISIBILITY_TIMEOUT_SECONDS = 12 * 3600


def make_celery(settings: Settings) -> Celery:
    broker = settings.broker_url_resolved
    app = Celery("tuneserve", broker=broker, include=["worker.tasks"])
    # Redis redelivers unacked messages after this; the embedded SQLAlchemy transport has no such notion (and
    # would pass the option on to create_engine).
    transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS} if broker.startswith("redis") else {}
    app.conf.update(
        task_queues=[Queue(TRAINING_QUEUE)],
        task_default_queue=TRAINING_QUEUE,
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        # One job per worker process, run in that process: killing it stops the training, nothing orphaned.
        worker_pool="solo",
        worker_concurrency=1,
        broker_transport_options=transport_options,
        result_backend_transport_options=transport_options,
        visibility_timeout=VISIBILITY_TIMEOUT_SECONDS,
        # A dead broker must not hang an API request: fail fast, the reconciler re-sends.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        broker_connection_timeout=3,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


celery_app = make_celery(get_settings())
