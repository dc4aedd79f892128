"""Idempotency keys (Stripe's contract), an API concern: the first answer to a POST with an `Idempotency-Key`
is stored per project and replayed to retries of the same request; the same key with another request is 422; a
retry while the first request is still in flight is 409 (which the openai SDK retries by itself).

A route takes `IdempotencyDep`: the dependency claims the key before the route runs (a replay answers at once,
the route never runs), the route makes its change and calls `commit`, which stores the answer in the change's
own transaction. A client error the route raises is stored like any answer; a server error releases the key
so a retry can succeed, and so does a body the route never saw because it failed validation (the corrected
request may use the key). Once the answer is committed, nothing that fails after it touches the key: a retry
replays it. Services know nothing of this. Expired keys are purged by the reconciler (app/jobs/reconcile.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.api.deps import ProjectDep, SessionDep, SessionmakerDep, SettingsDep
from app.db import rows_matched
from app.errors import Conflict, TuneserveError, Unprocessable
from app.services.keys import CurrentProject
from app.tables import IdempotencyKey

# A first request that has not finished in this long is taken to have died with its process.
IN_FLIGHT_TIMEOUT_SECONDS = 60.0
MAX_KEY_LENGTH = 255

Answer = TypeVar("Answer", bound=BaseModel)


class Replayed(Exception):
    """The stored answer to a request already made: sent as it was first given, whatever its status."""

    def __init__(self, status_code: int, body: dict[str, Any]):
        super().__init__(status_code)
        self.status_code, self.body = status_code, body


def fingerprint(method: str, path: str, body: object) -> str:
    """The request as JSON can say it: `body` is the parsed JSON body (any JSON value) or its text."""
    canonical = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def begin(
    factory: sessionmaker[Session], project: CurrentProject, key: str, request_hash: str, ttl_seconds: float
) -> Replayed | None:
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
            taken = rows_matched(
                session,
                update(IdempotencyKey)
                .where(
                    IdempotencyKey.project_id == project.id,
                    IdempotencyKey.key == key,
                    IdempotencyKey.created_at == row.created_at,
                )
                .values(request_hash=request_hash, status_code=None, response=None, created_at=now),
            )
            session.commit()
            if taken == 1:
                return None
            raise Conflict("Idempotency-Key is being reused concurrently; retry.", code="idempotency_key_in_use")
        if row.request_hash != request_hash:
            raise Unprocessable(
                "This Idempotency-Key was used with a different request.",
                param="Idempotency-Key",
                code="idempotency_key_mismatch",
            )
        if row.status_code is None or row.response is None:  # `complete` writes both at once
            raise Conflict("A request with this Idempotency-Key is still in progress.", code="idempotency_key_in_use")
        return Replayed(row.status_code, row.response)


def complete(session: Session, project: CurrentProject, key: str, status_code: int, body: dict[str, Any]) -> None:
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


def install_replay_handler(app: FastAPI) -> None:
    @app.exception_handler(Replayed)
    async def _replay(_request: Request, exc: Replayed) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status_code)


class IdempotentRequest:
    """This request's hold on its key, if it sent one."""

    def __init__(self, factory: sessionmaker[Session], project: CurrentProject, key: str | None):
        self.factory, self.project, self.key = factory, project, key
        self.committed = False

    def commit(self, session: Session, answer: Answer) -> Answer:
        """Store `answer` with the change in `session`, and commit both at once."""
        if self.key is not None:
            complete(session, self.project, self.key, 200, answer.model_dump(mode="json"))
        session.commit()
        self.committed = True
        return answer


def _request_json(raw: bytes) -> object:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return raw.decode("utf-8", "replace")  # not JSON: the route refuses it; fingerprint the text


async def idempotent_request(
    request: Request,
    session: SessionDep,
    factory: SessionmakerDep,
    project: ProjectDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> AsyncIterator[IdempotentRequest]:
    held = IdempotentRequest(factory, project, idempotency_key)
    if idempotency_key is None:
        yield held
        return
    request_hash = fingerprint(request.method, request.url.path, _request_json(await request.body()))
    replay = await run_in_threadpool(
        begin, factory, project, idempotency_key, request_hash, settings.idempotency_ttl_seconds
    )
    if replay is not None:
        raise Replayed(replay.status_code, replay.body)
    try:
        yield held
    except BaseException as error:
        if held.committed:
            raise  # the change and its stored answer are in: a retry replays them, whatever failed after
        # The route's session may hold SQLite's write lock; give it up before writing the key elsewhere.
        await run_in_threadpool(session.rollback)
        if isinstance(error, TuneserveError):
            await run_in_threadpool(record_error, factory, project, idempotency_key, error)
        else:
            await run_in_threadpool(_release_now, factory, project, idempotency_key)
        raise


def _release_now(factory: sessionmaker[Session], project: CurrentProject, key: str) -> None:
    with factory() as session:
        release(session, project, key)
        session.commit()


IdempotencyDep = Annotated[IdempotentRequest, Depends(idempotent_request)]
