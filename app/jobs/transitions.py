"""The job state machine: the one table of legal moves, and each move as one compare-and-set.

Every change of a job's status goes through a function here (creation inserts the first, `queued`). Each
updates the row only if its status, attempt and pending pause are still what the caller read (so two writers
never both win), writes the move's event in the same transaction, and returns whether it won. The API locks
the row before it moves a job (a lock Postgres honours; SQLite serialises writers instead, so there a move can
lose to a worker's and the API reads the job again); a worker moves only the job its fenced claim owns (see
worker/leases.py).

  queued --claim--> running --succeed--> succeeded
    |  ^              |  \--fail--> failed
    |  |              |   \--requeue (lease expired)--> queued; or re-claimed at once
    |  |              |--request_pause: stays running; its worker checkpoints, then --acknowledge_pause-->
    |  |              |  (or its worker is lost meanwhile --settle_pause-->)            paused
    |  +--resume--------------------------------------------------------------------- paused
    +--pause (a queued job, at once)-------------------------------------------------> paused
  any but succeeded/failed/cancelled --cancel--> cancelled
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db import rows_matched
from app.jobs.events import add_event
from app.jobs.status import TERMINAL, JobStatus
from app.tables import Job, now

S = JobStatus
# move -> (the statuses it may start from, the status it ends in)
LEGAL: dict[str, tuple[frozenset[JobStatus], JobStatus]] = {
    "claim": (frozenset({S.QUEUED, S.RUNNING}), S.RUNNING),  # from running: a job whose lease expired
    "requeue": (frozenset({S.RUNNING}), S.QUEUED),
    "succeed": (frozenset({S.RUNNING}), S.SUCCEEDED),
    "fail": (frozenset({S.QUEUED, S.RUNNING}), S.FAILED),
    "request_pause": (frozenset({S.RUNNING}), S.RUNNING),
    "pause_queued": (frozenset({S.QUEUED}), S.PAUSED),
    "acknowledge_pause": (frozenset({S.RUNNING}), S.PAUSED),
    "settle_pause": (frozenset({S.RUNNING}), S.PAUSED),  # the worker was lost before it acknowledged
    "withdraw_pause": (frozenset({S.RUNNING}), S.RUNNING),
    "resume": (frozenset({S.PAUSED}), S.QUEUED),
    "cancel": (frozenset(S) - TERMINAL, S.CANCELLED),
}


def _move(session: Session, job: Job, move: str, **values: object) -> bool:
    sources, target = LEGAL[move]
    if job.status not in sources:
        return False
    matched = rows_matched(
        session,
        update(Job)
        .where(
            Job.id == job.id,
            Job.attempt == job.attempt,
            Job.status == job.status,
            Job.pause_requested.is_(job.pause_requested),
        )
        .values(status=target.value, **values)
        .execution_options(synchronize_session=False),
    )
    if matched != 1:
        return False
    session.refresh(job)
    return True


def claim(session: Session, job: Job, *, lease_seconds: float, worker: str, resumed_from: int | None) -> bool:
    """A worker takes the job: the attempt number goes up by one and becomes its fencing token. Taking a running
    job (its lease expired) means its worker was lost."""
    attempt = job.attempt + 1
    moved = _move(
        session,
        job,
        "claim",
        attempt=attempt,
        lost_workers=job.lost_workers + (job.status == S.RUNNING),
        lease_until=time.time() + lease_seconds,
        worker=worker,
        estimated_finish=None,
        pause_requested=False,
    )
    if moved and resumed_from:
        add_event(session, job.id, f"Fine-tuning job resumed from step {resumed_from} (attempt {attempt})")
    elif moved:
        add_event(session, job.id, "Fine-tuning job started")
    return moved


def requeue(session: Session, job: Job, message: str, *, worker_lost: bool) -> bool:
    """Back to the queue (its worker was lost, or gave the job back); the next claim resumes from the last
    checkpoint."""
    cleared = {"lease_until": None, "dispatched_at": None, "estimated_finish": None, "pause_requested": False}
    moved = _move(session, job, "requeue", lost_workers=job.lost_workers + worker_lost, **cleared)
    if moved:
        add_event(session, job.id, message, level="warn")
    return moved


def succeed(
    session: Session,
    job: Job,
    *,
    model: str,
    trained_tokens: int,
    result_files: list[str],
    evaluation: dict[str, Any] | None = None,
) -> bool:
    """`evaluation`: the evaluation report's summary, kept on the job and carried by its last event."""
    moved = _move(
        session,
        job,
        "succeed",
        finished_at=now(),
        fine_tuned_model=model,
        trained_tokens=trained_tokens,
        result_files=result_files,
        evaluation=evaluation,
        lease_until=None,
        estimated_finish=None,
        pause_requested=False,
    )
    if moved:
        add_event(session, job.id, f"New fine-tuned model created: {model}", data={"model": model})
        data = {"evaluation": evaluation} if evaluation else None
        add_event(session, job.id, "The job has successfully completed", data=data)
    return moved


def fail(session: Session, job: Job, code: str, message: str, param: str | None = None) -> bool:
    error = {"code": code, "message": message, "param": param}
    cleared = {"lease_until": None, "estimated_finish": None, "pause_requested": False}
    moved = _move(session, job, "fail", finished_at=now(), error=error, **cleared)
    if moved:
        add_event(session, job.id, f"Fine-tuning job failed: {message}", level="error")
    return moved


def cancel(session: Session, job: Job) -> bool:
    """A running worker sees the change at its next heartbeat and stops without publishing anything."""
    moved = _move(session, job, "cancel", finished_at=now(), estimated_finish=None, pause_requested=False)
    if moved:
        add_event(session, job.id, "Fine-tuning job cancelled")
    return moved


def pause(session: Session, job: Job) -> bool:
    """A queued job pauses at once. A running one keeps running until its worker has written a checkpoint and
    let go (`acknowledge_pause`), so the status a client reads is always true."""
    if job.status == S.QUEUED:
        moved = _move(session, job, "pause_queued", estimated_finish=None)
        if moved:
            add_event(session, job.id, "Fine-tuning job paused")
        return moved
    if job.pause_requested:
        return job.status == S.RUNNING  # asked already: nothing more to do
    moved = _move(session, job, "request_pause", pause_requested=True)
    if moved:
        add_event(session, job.id, "Pause requested; the job pauses after writing a checkpoint")
    return moved


def acknowledge_pause(session: Session, job: Job, step: int) -> bool:
    """The worker has checkpointed at `step` and stopped: now the job is paused."""
    if not job.pause_requested:
        return False
    moved = _move(session, job, "acknowledge_pause", lease_until=None, estimated_finish=None, pause_requested=False)
    if moved:
        add_event(session, job.id, f"Fine-tuning job paused at step {step}; resume continues from there")
    return moved


def settle_pause(session: Session, job: Job, checkpoint_step: int | None) -> bool:
    """A pause was asked for, but the job's worker was lost before it let go: the job is paused where its last
    checkpoint left it, as asked, rather than re-queued."""
    if not job.pause_requested:
        return False
    moved = _move(session, job, "settle_pause", lease_until=None, estimated_finish=None, pause_requested=False)
    if moved:
        where = f"at step {checkpoint_step}" if checkpoint_step else "before its first checkpoint"
        add_event(session, job.id, f"Fine-tuning job paused {where} (its worker stopped); resume continues there")
    return moved


def resume(session: Session, job: Job) -> bool:
    """A paused job goes back to the queue. A running job whose pause is still pending simply keeps running."""
    if job.status == S.RUNNING and job.pause_requested:
        moved = _move(session, job, "withdraw_pause", pause_requested=False)
        if moved:
            add_event(session, job.id, "Pause withdrawn; the job keeps running")
        return moved
    moved = _move(session, job, "resume", dispatched_at=time.time())
    if moved:
        add_event(session, job.id, "Fine-tuning job resumed")
    return moved
