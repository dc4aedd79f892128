"""Request dependencies: long-lived objects from app.state, a DB session, and the caller's project.

What does no I/O is `async def`: FastAPI runs a plain `def` dependency in the threadpool, one hop (a thread and a
GIL hand-off) each, and under load those hops queue behind every other request's."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import unquote

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from app.api.replicas import INTERNAL_TOKEN_HEADER, PROJECT_ID_HEADER, PROJECT_NAME_HEADER, ReplicaPool
from app.config import Settings
from app.errors import AuthenticationFailed, ServiceUnavailable
from app.inference import InferenceEngine
from app.jobs.broker import JobDispatcher
from app.ml.registry import BaseModelRegistry
from app.services import keys
from app.services.completions import Serving
from app.services.keys import CurrentProject
from app.services.tokenization import Tokenization
from app.storage import Storage

_bearer = HTTPBearer(auto_error=False, description="An API key from `tuneserve keys create`.")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_registry(request: Request) -> BaseModelRegistry:
    return request.app.state.registry


async def get_sessionmaker(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessionmaker


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
RegistryDep = Annotated[BaseModelRegistry, Depends(get_registry)]
SessionmakerDep = Annotated[sessionmaker[Session], Depends(get_sessionmaker)]


def current_project(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> CurrentProject:
    project = keys.authenticate(session, credentials.credentials if credentials else None)
    release_connection(session)  # what follows may wait on the client (an upload body) before its next query
    return project


def release_connection(session: Session) -> None:
    """End the session's transaction so its connection goes back to the pool; the session stays usable (its
    next query takes a connection again). Called before anything that waits on a client or on generation, so
    slow clients and long streams cannot exhaust the pool for everyone else."""
    session.close()


ProjectDep = Annotated[CurrentProject, Depends(current_project)]


async def forwarded_project(request: Request) -> CurrentProject:
    """On an inference replica, in place of `current_project`: the project the API authenticated, named by the
    API in headers that only requests carrying the shared internal token are believed for."""
    expected = request.app.state.settings.internal_token
    token = request.headers.get(INTERNAL_TOKEN_HEADER, "")
    if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        raise AuthenticationFailed(
            "This inference replica answers only its API (missing or wrong internal token).",
            code="invalid_internal_token",
        )
    headers = request.headers
    return CurrentProject(id=headers.get(PROJECT_ID_HEADER, ""), name=unquote(headers.get(PROJECT_NAME_HEADER, "")))


async def get_replicas(request: Request) -> ReplicaPool:
    return request.app.state.replicas


ReplicasDep = Annotated[ReplicaPool, Depends(get_replicas)]


async def get_dispatcher(request: Request) -> JobDispatcher:
    return request.app.state.dispatcher


DispatcherDep = Annotated[JobDispatcher, Depends(get_dispatcher)]


async def get_inference(request: Request) -> InferenceEngine | None:
    """The serving engine, or None on a server started with TUNESERVE_INFERENCE=off."""
    return request.app.state.inference


InferenceDep = Annotated[InferenceEngine | None, Depends(get_inference)]


async def require_inference(engine: InferenceDep) -> InferenceEngine:
    if engine is None:
        raise ServiceUnavailable("Inference is off on this server (TUNESERVE_INFERENCE=off).", code="inference_off")
    return engine


EngineDep = Annotated[InferenceEngine, Depends(require_inference)]


async def serving(
    project: ProjectDep,
    session: SessionDep,
    registry: RegistryDep,
    storage: StorageDep,
    settings: SettingsDep,
    engine: EngineDep,
    request: Request,
) -> Serving:
    return Serving(session, project, registry, storage, engine, settings, request.app.state.rate_limiter)


ServingDep = Annotated[Serving, Depends(serving)]


def optional_project(session: SessionDep, request: Request) -> CurrentProject | None:
    """The caller's project when a key is sent (a wrong one is still 401); None when none is. Read from the header
    itself rather than through the bearer scheme, so the published schema does not state a key is required."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if not scheme:
        return None
    project = keys.authenticate(session, key.strip() if scheme.lower() == "bearer" else None)
    release_connection(session)
    return project


async def tokenization(
    project: Annotated[CurrentProject | None, Depends(optional_project)],
    session: SessionDep,
    registry: RegistryDep,
    settings: SettingsDep,
) -> Tokenization:
    return Tokenization(session, project, registry, settings)


TokenizationDep = Annotated[Tokenization, Depends(tokenization)]
