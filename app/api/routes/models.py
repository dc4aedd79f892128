"""/v1/models: base models and this project's fine-tuned models; adapter download."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.api.deps import ProjectDep, RegistryDep, SessionDep, StorageDep
from app.schemas.errors import ERROR_RESPONSES
from app.schemas.models import ModelDeleted, ModelList, ModelObject
from app.services import models
from app.services.models import ModelInfo

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


def _object(info: ModelInfo) -> ModelObject:
    return ModelObject(id=info.id, created=info.created, owned_by=info.owned_by)


@router.get("", response_model=ModelList)
def list_models(project: ProjectDep, session: SessionDep, registry: RegistryDep) -> ModelList:
    return ModelList(data=[_object(m) for m in models.list_models(session, project, registry)])


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
    models.adapter_dir(storage, info)  # a base model has no adapter: 404 before any byte is sent
    filename = info.id.replace(":", "_").replace("/", "_") + ".tar"
    return StreamingResponse(
        models.adapter_tar(storage, info),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/{model:path}", response_model=ModelObject)
def retrieve_model(model: str, project: ProjectDep, session: SessionDep, registry: RegistryDep) -> ModelObject:
    return _object(models.get_model(session, project, registry, model))


@router.delete("/{model:path}", response_model=ModelDeleted)
def delete_model(
    model: str, request: Request, project: ProjectDep, session: SessionDep, storage: StorageDep, registry: RegistryDep
) -> ModelDeleted:
    deleted = models.delete_model(session, storage, registry, project, model)
    engine = request.app.state.inference
    if engine is not None:
        engine.evict(deleted)  # later requests for it are 404; its memory goes back now
    return ModelDeleted(id=deleted)
