"""Sending jobs to workers. The broker is only a doorbell: a send that fails is logged and retried by the
reconciler, because the job's row (committed before any send) is what says there is work."""

from __future__ import annotations

import logging

from app.config import Settings

log = logging.getLogger("tuneserve.dispatch")

TRAIN_TASK = "tuneserve.train_job"


class JobDispatcher:
    def __init__(self, settings: Settings):
        from worker.celery_app import TRAINING_QUEUE, make_celery

        self._celery = make_celery(settings)
        self._queue = TRAINING_QUEUE

    def send(self, job_id: str) -> bool:
        try:
            self._celery.send_task(TRAIN_TASK, args=[job_id], queue=self._queue)
            return True
        except Exception as exc:  # any broker failure: the reconciler re-sends from the database
            log.warning("could not send job %s to the broker (%s); the reconciler will retry", job_id, exc)
            return False

    def close(self) -> None:
        self._celery.close()
