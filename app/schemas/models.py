"""Wire objects of the Models API, mirroring OpenAI's."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str

    @classmethod
    def of(cls, info) -> ModelObject:
        """From a `ModelInfo` of the models service (what it knows beyond these fields stays server-side)."""
        return cls(id=info.id, created=info.created, owned_by=info.owned_by)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
