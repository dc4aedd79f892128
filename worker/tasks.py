"""Celery tasks: thin. They take ids, never objects; running one twice is harmless (see worker/leases.py)."""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready

from app.jobs.broker import TRAIN_TASK
from app.jobs.reconcile import reconcile
from worker.celery_app import celery_app
from worker.context import worker_context
from worker.runner import run_job

log = logging.getLogger("tuneserve.tasks")


@celery_app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> str:
    """Claim the job in the database and train it, or do nothing if it is not ours to run."""
    outcome = run_job(worker_context(), job_id)
    log.info("job %s: %s", job_id, outcome)
    return outcome


@worker_ready.connect
def start_reconciler(**_kwargs: object) -> None:
    """Each worker also re-drives what the broker lost: expired leases, jobs left queued."""
    ctx = worker_context()

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(ctx.settings.reconcile_interval_seconds):
            try:
                reconcile(ctx.sessionmaker, ctx.dispatcher, ctx.settings)
            except Exception:
                log.warning("reconcile pass failed", exc_info=True)

    threading.Thread(target=loop, name="reconciler", daemon=True).start()
