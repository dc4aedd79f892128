"""OpenAI's list objects: a page of items and whether more follow; files and checkpoints also name their first
and last item (their `after` cursor is an item id). Built from a service's page in one call, e.g.
`FileList.of(page, FileObject.of)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Literal, Protocol, Self, TypeVar

from pydantic import BaseModel

Item = TypeVar("Item")


class Identified(BaseModel):
    """A wire object with an id: what a cursor page names its first and last items by."""

    id: str


IdItem = TypeVar("IdItem", bound=Identified)


class RowPage(Protocol):
    """What the services return (`app.services.pagination.Page`)."""

    data: list
    has_more: bool


class ListPage(BaseModel, Generic[Item]):
    object: Literal["list"] = "list"
    data: list[Item]
    has_more: bool

    @classmethod
    def of(cls, page: RowPage, item: Callable[[Any], Item]) -> Self:
        """The wire page of a service's page: `item` turns each row into its wire object."""
        return cls._of([item(row) for row in page.data], page.has_more)

    @classmethod
    def _of(cls, data: list[Item], has_more: bool) -> Self:
        return cls(data=data, has_more=has_more)


class CursorPage(ListPage[IdItem], Generic[IdItem]):
    first_id: str | None
    last_id: str | None

    @classmethod
    def _of(cls, data: list[IdItem], has_more: bool) -> Self:
        first_id, last_id = (data[0].id, data[-1].id) if data else (None, None)
        return cls(data=data, has_more=has_more, first_id=first_id, last_id=last_id)
