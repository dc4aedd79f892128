"""Idempotency keys (Stripe's contract): the first response to a POST with an `Idempotency-Key` is stored
per project and replayed to retries of the same request; the same key with another body is 422; a retry
while the first request is still in flight is 409 (which the openai SDK retries by itself)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import Conflict, TuneserveError, Unprocessable
from app.services.keys import CurrentProject
from app.tables import IdempotencyKey

# A first request that has not finished in this long is taken to have died with its process.
IN_FLIGHT_TIMEOUT_SECONDS = 60.0
MAX_KEY_LENGTH = 255


@dataclass
class Replay:
    status_code: int
    body: dict


def fingerprint(method: str, path: str, body: dict) -> str:
    canonical = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def begin(
    factory: sessionmaker[Session], project: CurrentProject, key: str, request_hash: str, ttl_seconds: float
) -> Replay | None:
    """Claim the key for this request (None: go ahead) or return the stored response to replay."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise Unprocessable(f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} characters.", param="Idempotency-Key")
    now = time.time()
    with factory() as session:
        try:
            session.add(IdempotencyKey(project_id=project.id, key=key, request_hash=request_hash, created_at=now))
            session.commit()
            return None
        except IntegrityError:
            session.rollback()
        row = session.scalar(
            select(IdempotencyKey).where(IdempotencyKey.project_id == project.id, IdempotencyKey.key == key)
        )
        if row is None:  # expired and purged between our insert and this read
            raise Conflict("Idempotency-Key is being reused concurrently; retry.", code="idempotency_key_in_use")
        expired = row.created_at < now - ttl_seconds
        abandoned = row.status_code is None and row.created_at < now - IN_FLIGHT_TIMEOUT_SECONDS
        if expired or abandoned:
            taken = session.execute(
                update(IdempotencyKey)
                .where(
                    IdempotencyKey.project_id == project.id,
                    IdempotencyKey.key == key,
                    IdempotencyKey.created_at == row.created_at,
                )
                .values(request_hash=request_hash, status_code=None, response=None, created_at=now)
            )
            session.commit()
            if taken.rowcount == 1:
                return None
            raise Conflict("Idempotency-Key is being reused concurrently; retry.", code="idempotency_key_in_use")
        if row.request_hash != request_hash:
            raise Unprocessable(
                "This Idempotency-Key was used with a different request.",
                param="Idempotency-Key",
                code="idempotency_key_mismatch",
            )
        if row.status_code is None:
            raise Conflict("A request with this Idempotency-Key is still in progress.", code="idempotency_key_in_use")
        return Replay(row.status_code, row.response)


def complete(session: Session, project: CurrentProject, key: str, status_code: int, body: dict) -> None:
    """Store the response; call inside the transaction that made the change, so both commit or neither."""
    session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.project_id == project.id, IdempotencyKey.key == key)
        .values(status_code=status_code, response=body)
    )


def record_error(factory: sessionmaker[Session], project: CurrentProject, key: str, error: TuneserveError) -> None:
    """A client error is a response like any other: a retry of the same request gets it again. Server errors
    release the key instead, so a retry can succeed."""
    with factory() as session:
        if error.status < 500:
            complete(session, project, key, error.status, error.envelope())
        else:
            release(session, project, key)
        session.commit()


def release(session: Session, project: CurrentProject, key: str) -> None:
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.project_id == project.id, IdempotencyKey.key == key))


def purge_expired(session: Session, ttl_seconds: float) -> int:
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < time.time() - ttl_seconds))
    return result.rowcount


def run(
    factory: sessionmaker[Session],
    session: Session,
    project: CurrentProject,
    key: str | None,
    request_hash: str,
    ttl_seconds: float,
    action: Callable[[Session], dict],
) -> tuple[int, dict, bool]:
    """Run `action` (which changes `session` and returns the response body) once per key, committing its change
    and the stored response together. Returns (status code, body, replayed)."""
    if key is None:
        body = action(session)
        session.commit()
        return 200, body, False
    replay = begin(factory, project, key, request_hash, ttl_seconds)
    if replay is not None:
        return replay.status_code, replay.body, True
    try:
        body = action(session)
        complete(session, project, key, 200, body)
        session.commit()
    except TuneserveError as error:
        session.rollback()
        record_error(factory, project, key, error)
        raise
    except BaseException:
        session.rollback()
        with factory() as cleanup:
            release(cleanup, project, key)
            cleanup.commit()
        raise
    return 200, body, False
