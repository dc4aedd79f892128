"""Database tables (SQLAlchemy 2). They change only together with an Alembic revision in migrations/."""

from __future__ import annotations

import time
from typing import Literal

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The values a few string columns hold, as the wire objects spell them (OpenAI's file status, event level and type).
FileStatus = Literal["uploaded", "processed", "error"]
EventLevel = Literal["info", "warn", "error"]
EventType = Literal["message", "metrics"]


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    # Only a SHA-256 of the key is kept; the prefix lets people tell keys apart in listings.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


class File(Base):
    __tablename__ = "files"

    # `seq` orders listings and pagination cursors; `id` is the public, random identifier.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[FileStatus] = mapped_column(String(16))
    status_details: Mapped[str | None] = mapped_column(Text)
    # For training files: the format and statistics found by validation, used by the jobs API.
    format: Mapped[str | None] = mapped_column(String(32))
    n_examples: Mapped[int | None] = mapped_column(Integer)
    stats: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Job(Base):
    """A fine-tuning job. `attempt` and `lease_until` are the worker's claim: only the holder of the current
    attempt may write, and only while its lease is live (see worker/leases.py)."""

    __tablename__ = "jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(255))  # as requested: a base model or a fine-tuned model
    base_model: Mapped[str] = mapped_column(String(255))  # the base model the adapter sits on
    parent_model: Mapped[str | None] = mapped_column(String(255))  # the fine-tuned model continued from
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    method: Mapped[dict] = mapped_column(JSON)
    options: Mapped[dict] = mapped_column(JSON)  # every hyperparameter as requested ("auto" or a value)
    resolved_hyperparameters: Mapped[dict | None] = mapped_column(JSON)
    user_metadata: Mapped[dict | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), index=True)
    error: Mapped[dict | None] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(255))
    dispatched_at: Mapped[float | None] = mapped_column(Float)
    # A client asked a running job to pause; it stays running until its worker has checkpointed and let go.
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Workers that stopped without finishing it (lease expired): the attempt limit counts these, not the claims,
    # so pausing and resuming never uses it up.
    lost_workers: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The summary of the evaluation report (base vs fine-tuned on the validation file), once the job succeeded.
    evaluation: Mapped[dict | None] = mapped_column(JSON)


class JobEvent(Base):
    __tablename__ = "job_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[EventLevel] = mapped_column(String(8))
    type: Mapped[EventType] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON)


class JobCheckpoint(Base):
    __tablename__ = "job_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_number"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(255))
    storage_key: Mapped[str] = mapped_column(String(255))  # full resume state; its adapter files serve as-is
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class FineTunedModel(Base):
    """A published adapter: the job's final model or one of its checkpoints."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # ft:{base}:{project}:{suffix}:{short}[:ckpt-step-N]
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    base_model: Mapped[str] = mapped_column(String(255))
    step_number: Mapped[int | None] = mapped_column(Integer)  # set for checkpoint models
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class IdempotencyKey(Base):
    """The first response to a POST with an `Idempotency-Key`, replayed to retries of the same request."""

    __tablename__ = "idempotency_keys"

    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer)  # None while the first request is in flight
    response: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
