"""The one place that reads the environment: every setting is `TUNESERVE_<NAME>`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceParseError

ENV_PREFIX = "TUNESERVE_"


class SettingsError(RuntimeError):
    """An invalid setting; the message is one line that names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    data_dir: Path = Path("./data")
    # Default: SQLite under the data dir (see `database_url_resolved`).
    database_url: str | None = None
    # Default: a broker that needs no server (kombu's SQLAlchemy transport on SQLite under the data dir).
    broker_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_key: str | None = None
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    max_json_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)  # any JSON request body (app/api/json_bodies.py)
    max_json_depth: int = Field(default=64, ge=2)
    # Blob storage: the data directory unless this is `s3://bucket/prefix` (endpoint and credentials from the
    # standard AWS variables: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). What a process fetched from object storage
    # is kept in a local cache of at most storage_cache_bytes under the data directory.
    storage_url: str | None = Field(default=None, pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
    storage_cache_bytes: int = Field(default=20 * 1024**3, gt=0)
    base_models: dict[str, str] = Field(default_factory=dict)
    inference: Literal["on", "off"] = "on"
    # Inference replicas (`tuneserve inference`, each on its own GPU) that this API forwards /v1/completions and
    # /v1/chat/completions to, a model always to the same one while the list is unchanged (app/api/replicas.py).
    # Empty: inference runs in this process, as `inference` says.
    inference_replicas: list[str] = Field(default_factory=list)
    # Shared by the API and its replicas: a replica answers only requests that carry it (the API authenticated
    # the caller and names the project).
    internal_token: str | None = Field(default=None, min_length=16, validate_default=True)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace_seconds: int = Field(default=30, ge=0)  # for in-flight requests after SIGTERM

    # Database connections per API process; a request that waits db_pool_timeout_seconds for one is answered
    # 503 with Retry-After. Requests hold one only while they query, never while generating or streaming.
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)
    db_pool_timeout_seconds: float = Field(default=10.0, gt=0)

    # Inference.
    max_tokens_limit: int = Field(default=4096, ge=1)  # per request
    # Alternatives per token that `logprobs` (completions) and `top_logprobs` (chat) may ask for. OpenAI allows 5 on
    # completions and 20 on chat; each costs a top-k over the vocabulary per token.
    max_logprobs: int = Field(default=20, ge=0)
    # The model /tokenize, /detokenize and /tokenizer_info use when a request names none (vLLM serves one model;
    # clients such as lm-eval do not name it there).
    default_model: str = "tuneserve-tiny"
    # One request may not occupy the engine alone: prompts x n sequences, and messages in a conversation.
    max_sequences_per_request: int = Field(default=64, ge=1)
    max_messages_per_request: int = Field(default=2048, ge=1)
    max_batch_size: int = Field(default=16, ge=1)  # sequences decoded together
    max_waiting_per_project: int = Field(default=256, ge=1)  # sequences one project may have queued for the engine
    max_resident_adapters: int = Field(default=64, ge=1)
    max_lora_rank: int = Field(default=64, ge=1)  # the largest adapter rank served; job creation refuses more
    # Per project and API process, on the inference endpoints; unset means unlimited (app/services/rate_limits.py).
    rate_limit_requests_per_minute: int | None = Field(default=None, ge=1)
    rate_limit_tokens_per_minute: int | None = Field(default=None, ge=1)
    max_adapter_cache_bytes: int = Field(default=2 * 1024**3, gt=0)

    # Jobs. The database decides who owns a job: a worker holds a lease it renews every heartbeat.
    max_running_jobs_per_project: int = Field(default=4, ge=1)
    job_lease_seconds: float = Field(default=30.0, gt=0)
    job_heartbeat_seconds: float = Field(default=1.0, gt=0)  # also how often a worker notices cancel/pause
    job_redispatch_seconds: float = Field(default=30.0, gt=0)  # re-send a job left queued this long
    reconcile_interval_seconds: float = Field(default=5.0, gt=0)
    max_job_attempts: int = Field(default=3, ge=1)
    # Devices one job trains on, data-parallel (worker/training/ranks.py): GPUs 0..N-1 of the worker's machine, or
    # N processes sharing the CPU where there is no GPU. `tuneserve worker --devices N` sets it.
    train_devices: int = Field(default=1, ge=1)
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=24 * 3600)

    @field_validator("internal_token")
    @classmethod
    def _replicas_need_a_token(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("inference_replicas") and not value:
            raise ValueError("is required with TUNESERVE_INFERENCE_REPLICAS (the replicas answer only the API)")
        return value

    @field_validator("job_heartbeat_seconds")
    @classmethod
    def _heartbeat_within_lease(cls, value: float, info: ValidationInfo) -> float:
        lease = info.data.get("job_lease_seconds")
        if lease is not None and value * 2 > lease:
            raise ValueError(f"must be at most half of TUNESERVE_JOB_LEASE_SECONDS ({lease}), so one late beat is safe")
        return value

    @property
    def database_url_resolved(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tuneserve.db').resolve()}"

    @property
    def broker_url_resolved(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning pydantic's report into one line that names the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        raise SettingsError(f"invalid setting {ENV_PREFIX}{field.upper()}: {err['msg']}") from None
    except SourceParseError as exc:
        # pydantic-settings says 'error parsing value for field "base_models" ...' for bad JSON.
        field = str(exc).split('"')[1] if '"' in str(exc) else "?"
        raise SettingsError(f"invalid setting {ENV_PREFIX}{field.upper()}: not valid JSON") from None


@lru_cache
def get_settings() -> Settings:
    return load_settings()
