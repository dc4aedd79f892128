"""Models: the base models every project may use, and each project's fine-tuned adapters.

What deleting means: a job's final model is the job's output, so deleting it deletes the job's checkpoint models
(`<model>:ckpt-step-N`) with it. A checkpoint model may also be deleted alone; the final model and the other
checkpoints stay. Deleted models are gone from the list, from serving and from the adapter download at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from app.errors import InvalidRequest, NotFound
from app.ml.adapter_files import adapter_tar as adapter_tar_stream
from app.ml.registry import BaseModelRegistry
from app.model_lookup import find_fine_tuned_model, job_fine_tuned_models, project_fine_tuned_models
from app.services.keys import CurrentProject
from app.storage import Storage
from app.tables import FineTunedModel

if TYPE_CHECKING:
    from app.inference import InferenceEngine


@dataclass(frozen=True)
class ModelInfo:
    id: str
    created: int
    owned_by: str
    base_model: str
    adapter_key: str | None  # storage key of a fine-tuned model's adapter; None for a base model


def _not_found(model: str) -> NotFound:
    return NotFound(
        f"The model '{model}' does not exist or you do not have access to it.", param="model", code="model_not_found"
    )


def _base(name: str) -> ModelInfo:
    return ModelInfo(name, 0, "system", name, None)


def _fine_tuned(row: FineTunedModel, project: CurrentProject) -> ModelInfo:
    return ModelInfo(row.id, row.created_at, project.name, row.base_model, row.storage_key)


def list_models(session: Session, project: CurrentProject, registry: BaseModelRegistry) -> list[ModelInfo]:
    rows = project_fine_tuned_models(session, project.id)
    return [_base(name) for name in registry.names()] + [_fine_tuned(r, project) for r in rows]


def get_model(session: Session, project: CurrentProject, registry: BaseModelRegistry, model: str) -> ModelInfo:
    """A base model, or a fine-tuned model of this project; anything else (another project's too) is 404."""
    if model in registry.names():
        return _base(model)
    row = find_fine_tuned_model(session, project.id, model)
    if row is None:
        raise _not_found(model)
    return _fine_tuned(row, project)


def delete_model(
    session: Session,
    storage: Storage,
    registry: BaseModelRegistry,
    project: CurrentProject,
    model: str,
    engine: InferenceEngine | None = None,
) -> str:
    """Delete `model` (with its checkpoint models when it is a job's final model); returns its id."""
    if model in registry.names():
        raise InvalidRequest(f"'{model}' is a base model; only fine-tuned models can be deleted.", param="model")
    row = find_fine_tuned_model(session, project.id, model)
    if row is None:
        raise _not_found(model)
    is_checkpoint = row.step_number is not None
    rows = [row] if is_checkpoint else job_fine_tuned_models(session, project.id, row.job_id)
    for deleted in rows:
        session.delete(deleted)
    session.commit()
    # Files go after the commit: a crash leaves orphan files, never a model without its files.
    for deleted in rows:
        if engine is not None:
            engine.evict(deleted.id)  # requests for it are 404 from now on; its memory goes back now
        storage.delete(deleted.storage_key)
    return model


def adapter_dir(storage: Storage, info: ModelInfo) -> Path:
    if info.adapter_key is None:
        raise NotFound(
            f"The model '{info.id}' is a base model; it has no adapter.", param="model", code="not_a_fine_tuned_model"
        )
    try:
        return storage.local_dir(info.adapter_key)
    except FileNotFoundError:
        raise NotFound(f"The files of model '{info.id}' are missing", param="model", code="model_not_found") from None


def adapter_tar(storage: Storage, info: ModelInfo) -> Iterator[bytes]:
    """The adapter as an uncompressed tar of its config and weights, streamed (see `app.ml.adapter_files`)."""
    return adapter_tar_stream(adapter_dir(storage, info))
