"""The job requests that change things (create, cancel, pause, resume): each runs once per Idempotency-Key,
commits, and only then wakes a worker, so a task never names a job that is not in the database."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.dispatch import JobDispatcher
from app.ml.registry import BaseModelRegistry
from app.schemas.jobs import CreateJobRequest, job_object
from app.services import idempotency, jobs
from app.services.keys import CurrentProject
from app.tables import Job

ACTIONS = {"cancel": jobs.cancel_job, "pause": jobs.pause_job, "resume": jobs.resume_job}


class JobCommands:
    def __init__(
        self,
        session: Session,
        factory: sessionmaker[Session],
        project: CurrentProject,
        settings: Settings,
        dispatcher: JobDispatcher,
        idempotency_key: str | None,
    ):
        self.session, self.factory, self.project = session, factory, project
        self.settings, self.dispatcher, self.key = settings, dispatcher, idempotency_key

    def _run(self, path: str, request: dict, change: Callable[[Session], Job]) -> tuple[int, dict]:
        holder: dict[str, Job] = {}

        def action(session: Session) -> dict:
            holder["job"] = change(session)
            session.flush()
            return job_object(holder["job"], self.project.id).model_dump(mode="json")

        status, body, replayed = idempotency.run(
            self.factory,
            self.session,
            self.project,
            self.key,
            idempotency.fingerprint("POST", path, request),
            self.settings.idempotency_ttl_seconds,
            action,
        )
        job = holder.get("job")
        if not replayed and job is not None and job.status == "queued":
            self.dispatcher.send(job.id)  # after the commit, so the task never names a job not yet stored
        return status, body

    def create(self, request: CreateJobRequest, registry: BaseModelRegistry) -> tuple[int, dict]:
        return self._run(
            "/v1/fine_tuning/jobs",
            request.model_dump(mode="json", exclude_unset=True),
            lambda session: jobs.create_job(session, self.project, registry, request),
        )

    def act(self, job_id: str, action: str) -> tuple[int, dict]:
        """`action` is "cancel", "pause" or "resume"."""
        change = ACTIONS[action]
        return self._run(f"/v1/fine_tuning/jobs/{job_id}/{action}", {}, lambda s: change(s, self.project, job_id))
