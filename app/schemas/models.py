"""Wire objects of the Models API, mirroring OpenAI's."""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel


class ModelFacts(Protocol):
    """What a model object is built from (the models service's `ModelInfo`)."""

    @property
    def id(self) -> str: ...
    @property
    def created(self) -> int: ...
    @property
    def owned_by(self) -> str: ...


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str

    @classmethod
    def of(cls, info: ModelFacts) -> ModelObject:
        """From a `ModelInfo` of the models service (what it knows beyond these fields stays server-side)."""
        return cls(id=info.id, created=info.created, owned_by=info.owned_by)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
