"""Cursor pages as OpenAI returns them for files and checkpoints."""

from __future__ import annotations


def cursor_page(data: list, has_more: bool) -> dict:
    """The fields of a list page whose `after` cursor is an item id: data, has_more, first_id, last_id."""
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
    }
