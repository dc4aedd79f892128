"""Projects and API keys. A key is shown once; only its SHA-256 and a display prefix are stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import ids
from app.errors import AuthenticationFailed, InvalidRequest, NotFound
from app.tables import ApiKey, Project, now

KEY_PREFIX = "ts-"
DISPLAY_PREFIX_LEN = 12  # "ts-" and 9 random characters: enough to tell keys apart, useless to an attacker


@dataclass(frozen=True)
class CurrentProject:
    id: str
    name: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 256 random bits


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(id=ids.project_id(), name=name)
        session.add(project)
        session.flush()
    return project


def create_key(session: Session, project_name: str, key: str | None = None) -> str:
    """Store a key for the project (creating the project if needed) and return the key in clear, once."""
    if not project_name or len(project_name) > 64:
        raise InvalidRequest("project name must be 1-64 characters", param="project")
    key = key or new_key()
    project = get_or_create_project(session, project_name)
    digest = hash_key(key)
    if session.scalar(select(ApiKey).where(ApiKey.key_hash == digest)) is None:
        session.add(ApiKey(project_id=project.id, key_hash=digest, prefix=key[:DISPLAY_PREFIX_LEN]))
        session.flush()
    return key


def list_keys(session: Session) -> list[tuple[str, str, int, int | None]]:
    """(project name, prefix, created_at, revoked_at) of every key."""
    rows = session.execute(
        select(Project.name, ApiKey.prefix, ApiKey.created_at, ApiKey.revoked_at)
        .join(Project, Project.id == ApiKey.project_id)
        .order_by(ApiKey.id)
    )
    return [row.tuple() for row in rows]


def revoke_key(session: Session, prefix: str) -> int:
    """Revoke the live keys whose display prefix starts with `prefix`; refuse an ambiguous prefix."""
    keys = session.scalars(
        select(ApiKey).where(ApiKey.prefix.startswith(prefix, autoescape=True), ApiKey.revoked_at.is_(None))
    ).all()
    if not keys:
        raise NotFound(f"no live key has the prefix {prefix!r}", param="prefix")
    if len(keys) > 1:
        raise InvalidRequest(f"{len(keys)} keys have the prefix {prefix!r}; give more of it", param="prefix")
    keys[0].revoked_at = now()
    return 1


def project_has_keys(session: Session, project_name: str) -> bool:
    return (
        session.scalar(
            select(ApiKey.id).join(Project, Project.id == ApiKey.project_id).where(Project.name == project_name)
        )
        is not None
    )


def authenticate(session: Session, key: str | None) -> CurrentProject:
    if not key:
        raise AuthenticationFailed("Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key")
    row = session.execute(
        select(Project.id, Project.name)
        .join(ApiKey, ApiKey.project_id == Project.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
    return CurrentProject(id=row.id, name=row.name)
