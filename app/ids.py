"""Public identifiers. Random, URL-safe, and prefixed so a reader can tell what an id names."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def project_id() -> str:
    return f"proj_{_random(20)}"


def file_id() -> str:
    return f"file-{_random(24)}"
