"""Cursor pages as OpenAI's list endpoints serve them: up to `limit` rows after a cursor, and whether more follow.
Rows are ordered by an ever-growing `seq` column, so a page never skips or repeats a row when others are added."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

Row = TypeVar("Row")


@dataclass
class Page(Generic[Row]):
    data: list[Row]
    has_more: bool


def keyset_page(
    session: Session,
    query: Select,
    seq: InstrumentedAttribute[int],
    *,
    after: int | None,
    limit: int,
    descending: bool = True,
) -> Page:
    """Up to `limit` rows of `query` in `seq` order (newest first unless `descending` is False), starting after
    the row whose `seq` is `after`. One row more is read to learn whether another page follows."""
    if after is not None:
        query = query.where(seq < after if descending else seq > after)
    rows = list(session.scalars(query.order_by(seq.desc() if descending else seq.asc()).limit(limit + 1)))
    return Page(rows[:limit], len(rows) > limit)
