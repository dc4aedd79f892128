"""A thread that keeps a claimed job's lease alive and tells the training loop when to stop.

It renews the lease every `job_heartbeat_seconds` with a fenced write, so the loop's stop check costs no
database round trip per step: cancel or lost ownership -> "cancel" (stop, write nothing); a pause request ->
"pause" (checkpoint, then let go); a pause withdrawn before the loop acted on it -> carry on.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select, update

from app.db import session_scope
from app.tables import Job
from worker.context import WorkerContext
from worker.leases import Claim, fence
from worker.training.callbacks import StopRequest

log = logging.getLogger("tuneserve.heartbeat")


class Heartbeat:
    def __init__(self, ctx: WorkerContext, claim: Claim):
        self._ctx = ctx
        self._claim = claim
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.job_id}", daemon=True)
        self.stop_request: StopRequest = None
        self.eta_seconds: float | None = None

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def beat(self) -> None:
        claim = self._claim
        with session_scope(self._ctx.sessionmaker) as session:
            if not fence(session, claim, self._ctx.settings):
                self.stop_request = "cancel"  # cancelled, or the job is no longer ours: stop, write nothing
                return
            pause_requested = session.scalar(select(Job.pause_requested).where(Job.id == claim.job_id))
            if pause_requested:
                self.stop_request = "pause"
            elif self.stop_request == "pause":
                self.stop_request = None  # withdrawn before the loop acted on it
            if self.eta_seconds is not None:
                session.execute(
                    update(Job)
                    .where(Job.id == claim.job_id, Job.attempt == claim.attempt)
                    .values(estimated_finish=int(time.time() + self.eta_seconds))
                )

    def _run(self) -> None:
        while not self._stop.wait(self._ctx.settings.job_heartbeat_seconds):
            try:
                self.beat()
            except Exception:  # a database hiccup: keep trying; the lease has slack for a few misses
                log.warning("heartbeat for %s failed", self._claim.job_id, exc_info=True)
