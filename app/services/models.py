"""Models: the base models every project may use, and each project's fine-tuned adapters."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest, NotFound
from app.ml.registry import BaseModelRegistry
from app.services.keys import CurrentProject
from app.storage import LocalStorage
from app.tables import FineTunedModel

# Only what PEFT (and vLLM's --lora-modules) need; a checkpoint's optimizer state stays home.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class ModelInfo:
    id: str
    created: int
    owned_by: str
    base_model: str
    adapter_key: str | None  # storage key of a fine-tuned model's adapter; None for a base model


def _not_found(model: str) -> NotFound:
    return NotFound(f"The model '{model}' does not exist or you do not have access to it.", param="model",
                    code="model_not_found")  # fmt: skip


def list_models(session: Session, project: CurrentProject, registry: BaseModelRegistry) -> list[ModelInfo]:
    base = [ModelInfo(name, 0, "system", name, None) for name in registry.names()]
    rows = session.scalars(
        select(FineTunedModel).where(FineTunedModel.project_id == project.id).order_by(FineTunedModel.created_at)
    )
    return base + [ModelInfo(r.id, r.created_at, project.name, r.base_model, r.storage_key) for r in rows]


def get_model(session: Session, project: CurrentProject, registry: BaseModelRegistry, model: str) -> ModelInfo:
    """A base model, or a fine-tuned model of this project; anything else (another project's too) is 404."""
    if model in registry.names():
        return ModelInfo(model, 0, "system", model, None)
    row = session.scalar(
        select(FineTunedModel).where(FineTunedModel.id == model, FineTunedModel.project_id == project.id)
    )
    if row is None:
        raise _not_found(model)
    return ModelInfo(row.id, row.created_at, project.name, row.base_model, row.storage_key)


def delete_model(
    session: Session, storage: LocalStorage, registry: BaseModelRegistry, project: CurrentProject, model: str
) -> str:
    if model in registry.names():
        raise InvalidRequest(f"'{model}' is a base model; only fine-tuned models can be deleted.", param="model")
    row = session.scalar(
        select(FineTunedModel).where(FineTunedModel.id == model, FineTunedModel.project_id == project.id)
    )
    if row is None:
        raise _not_found(model)
    key = row.storage_key
    session.delete(row)
    session.commit()
    storage.delete(key)  # after the commit: a crash leaves an orphan directory, never a model without files
    return model


def adapter_dir(storage: LocalStorage, info: ModelInfo) -> Path:
    if info.adapter_key is None:
        raise NotFound(f"The model '{info.id}' is a base model; it has no adapter.", param="model",
                       code="not_a_fine_tuned_model")  # fmt: skip
    return storage.local_path(info.adapter_key)


def adapter_tar(storage: LocalStorage, info: ModelInfo) -> Iterator[bytes]:
    """The adapter as an uncompressed tar with its two files at the top level, streamed without buffering the
    whole archive: each member is its 512-byte header, its bytes, and padding to a 512-byte block."""
    directory = adapter_dir(storage, info)
    for name in ADAPTER_FILES:
        path = directory / name
        member = tarfile.TarInfo(name)
        member.size, member.mtime, member.mode = path.stat().st_size, int(path.stat().st_mtime), 0o644
        yield member.tobuf(format=tarfile.PAX_FORMAT)
        with open(path, "rb") as f:
            while chunk := f.read(1024 * 1024):
                yield chunk
        if member.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - member.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end of archive
