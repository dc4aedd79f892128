"""/v1/models: base models and this project's fine-tuned models; adapter download."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.api.deps import InferenceDep, ProjectDep, RegistryDep, SessionDep, StorageDep, release_connection
from app.schemas.errors import ERROR_RESPONSES
from app.schemas.models import ModelDeleted, ModelList, ModelObject
from app.services import models

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


@router.get("", response_model=ModelList)
def list_models(project: ProjectDep, session: SessionDep, registry: RegistryDep) -> ModelList:
    return ModelList(data=[ModelObject.of(m) for m in models.list_models(session, project, registry)])


# Declared before the catch-all `{model:path}` routes: model ids contain '/' and ':'.
@router.get(
    "/{model:path}/adapter",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}},
)
def download_adapter(
    model: str, project: ProjectDep, session: SessionDep, registry: RegistryDep, storage: StorageDep
) -> StreamingResponse:
    info = models.get_model(session, project, registry, model)
    body = models.adapter_tar(storage, info)  # a base model has no adapter: 404 before any byte is sent
    filename = info.id.replace(":", "_").replace("/", "_") + ".tar"
    release_connection(session)  # the archive streams for as long as the client takes
    return StreamingResponse(
        body, media_type="application/x-tar", headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


@router.get("/{model:path}", response_model=ModelObject)
def retrieve_model(model: str, project: ProjectDep, session: SessionDep, registry: RegistryDep) -> ModelObject:
    return ModelObject.of(models.get_model(session, project, registry, model))


@router.delete("/{model:path}", response_model=ModelDeleted)
def delete_model(
    model: str,
    project: ProjectDep,
    session: SessionDep,
    storage: StorageDep,
    registry: RegistryDep,
    engine: InferenceDep,
) -> ModelDeleted:
    return ModelDeleted(id=models.delete_model(session, storage, registry, project, model, engine))
