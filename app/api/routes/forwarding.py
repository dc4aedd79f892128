"""/v1/completions and /v1/chat/completions on an API with inference replicas: the caller is authenticated and the
model checked here (404 for a model the project cannot see, as in-process serving answers), then the request goes
to the model's replica (app/api/replicas.py), which validates and answers it."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import ProjectDep, RegistryDep, ReplicasDep, SessionDep, release_connection
from app.api.request_id import current_request_id
from app.errors import InvalidRequest
from app.schemas.errors import ERROR_RESPONSES
from app.services import models

router = APIRouter(prefix="/v1", tags=["inference"], responses=ERROR_RESPONSES)


def _model_named(body: bytes) -> str:
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):
        raise InvalidRequest("The body must be a JSON object.", param=None) from None
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    return model


async def _forward(
    path: str, request: Request, project: ProjectDep, session: SessionDep, registry: RegistryDep, replicas: ReplicasDep
) -> Response:
    body = await request.body()
    model = _model_named(body)

    def check_model() -> None:
        models.get_model(session, project, registry, model)  # NotFound for what this project cannot use
        release_connection(session)  # nothing more from the database while the replica answers

    await run_in_threadpool(check_model)
    return await replicas.forward(path, body, model, project, current_request_id.get())


@router.post("/completions")
async def create_completion(
    request: Request, project: ProjectDep, session: SessionDep, registry: RegistryDep, replicas: ReplicasDep
) -> Response:
    return await _forward("/v1/completions", request, project, session, registry, replicas)


@router.post("/chat/completions")
async def create_chat_completion(
    request: Request, project: ProjectDep, session: SessionDep, registry: RegistryDep, replicas: ReplicasDep
) -> Response:
    return await _forward("/v1/chat/completions", request, project, session, registry, replicas)
