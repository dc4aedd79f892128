"""The broker side of jobs: the one Celery configuration, and sending a job to the workers by task name, so
sending never imports the worker (and the API never loads torch).

Delivery choices (see docs/jobs.md): the database, not the broker, decides who runs a job. A worker claims a
job by compare-and-set on its row (attempt + lease) and renews the lease every heartbeat, so a second copy of
a message (Redis redelivers unacked messages after the visibility timeout) finds the job owned and does
nothing; a lost message (a flushed Redis, a worker killed before acking) is re-sent by the reconciler from
the job rows. Hence: late acks with prefetch 1 (a busy worker never holds a second job back from an idle
one), no requeue of a killed worker's message (the reconciler re-drives it with an attempt limit instead of a
poison loop), and a long visibility timeout, since redelivery is only a safety net.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery import Celery
from kombu import Queue

from app.config import Settings

log = logging.getLogger("tuneserve.broker")

TRAINING_QUEUE = "training"
TRAIN_TASK = "tuneserve.train_job"
VISIBILITY_TIMEOUT_SECONDS = 12 * 3600


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """The Celery app for this broker. The worker names its task modules in `include`; a sender needs none."""
    broker = settings.broker_url_resolved
    app = Celery("tuneserve", broker=broker, include=list(include))
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


class JobDispatcher:
    """Rings the workers' doorbell. A send that fails is logged and retried by the reconciler, because the job's
    row (committed before any send) is what says there is work."""

    def __init__(self, settings: Settings):
        self._celery = make_celery(settings)

    def send(self, job_id: str) -> bool:
        try:
            self._celery.send_task(TRAIN_TASK, args=[job_id], queue=TRAINING_QUEUE)
            return True
        except Exception as exc:  # any broker failure: the reconciler re-sends from the database
            log.warning("could not send job %s to the broker (%s); the reconciler will retry", job_id, exc)
            return False

    def close(self) -> None:
        self._celery.close()
