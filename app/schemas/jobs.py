"""Wire objects of the fine-tuning jobs API, mirroring OpenAI's (every field present, null where unknown)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from app.jobs.status import JobStatus
from app.schemas.json_types import INTEGRAL, JsonInt
from app.schemas.pages import CursorPage, Identified, ListPage
from app.tables import EventLevel, EventType, Job, JobCheckpoint, JobEvent

AutoOr = Literal["auto"] | int | float


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    n_epochs: Literal["auto"] | JsonInt = "auto"
    batch_size: Literal["auto"] | JsonInt = "auto"
    learning_rate_multiplier: Literal["auto"] | float = "auto"


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(strict=True)

    hyperparameters: dict[str, Any] | None = None


class DpoMethod(BaseModel):
    model_config = ConfigDict(strict=True)

    hyperparameters: dict[str, Any] | None = None


class Method(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class CreateJobRequest(BaseModel):
    """OpenAI's request, plus LoRA and engine options as extra keys (the SDK sends them via `extra_body`).
    Validated strictly: a value of another JSON type is a 400, not coerced."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=255)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    suffix: str | None = None
    seed: Annotated[int, Field(ge=0, le=2147483647), INTEGRAL] | None = None
    method: Method | None = None
    hyperparameters: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    # None are supported: the schema says so (no items), and a request that names one is refused by name.
    integrations: list[dict[str, Any]] | None = Field(default=None, max_length=0)

    @field_validator("integrations", mode="before")
    @classmethod
    def _no_integrations(cls, integrations: Any) -> Any:
        # Nothing here reports to Weights & Biases or anywhere else: accepting one would drop it silently and
        # the client would wait for a run that never appears. An empty list asks for nothing, so it passes.
        if isinstance(integrations, list) and integrations:
            names = {str(item.get("type") if isinstance(item, dict) else item)[:64] for item in integrations}
            kinds = ", ".join(sorted(names))
            raise PydanticCustomError(
                "unsupported_parameter", "integrations are not supported (requested: {kinds})", {"kinds": kinds}
            )
        return integrations


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    model_config = ConfigDict(extra="allow")  # echoed LoRA options ride along as extra keys

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    model: str
    organization_id: str
    status: JobStatus
    fine_tuned_model: str | None
    finished_at: int | None
    trained_tokens: int | None
    estimated_finish: int | None
    training_file: str
    validation_file: str | None
    result_files: list[str]
    seed: int
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    error: JobError | None
    integrations: list[dict[str, Any]] | None
    metadata: dict[str, str] | None
    user_provided_suffix: str | None
    # An extra of this service: the evaluation report's summary (a job with a validation file, once succeeded).
    evaluation: dict[str, Any] | None = None


class JobList(ListPage[FineTuningJob]):
    pass


class JobMetrics(BaseModel):
    """An extra of this service: a job's metric events as columns (`step`, `train_loss`, ...), for charts."""

    object: Literal["fine_tuning.job.metrics"] = "fine_tuning.job.metrics"
    data: dict[str, list[int | float | None]]  # `step` in integers
    last_id: str | None  # pass as `after` to get only what came since
    has_more: bool


class JobEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: EventLevel
    message: str
    type: EventType
    data: dict[str, Any] | None

    @classmethod
    def of(cls, row: JobEvent) -> JobEventObject:
        return cls(
            id=row.id, created_at=row.created_at, level=row.level, message=row.message, type=row.type, data=row.data
        )


class JobEventList(ListPage[JobEventObject]):
    pass


class CheckpointObject(Identified):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float | int | None]

    @classmethod
    def of(cls, row: JobCheckpoint) -> CheckpointObject:
        return cls(
            id=row.id,
            created_at=row.created_at,
            fine_tuned_model_checkpoint=row.fine_tuned_model_checkpoint,
            fine_tuning_job_id=row.job_id,
            step_number=row.step_number,
            metrics=row.metrics,
        )


class CheckpointList(CursorPage[CheckpointObject]):
    pass


def job_object(row: Job, organization_id: str) -> FineTuningJob:
    """The job as a client sees it: requested values while queued, resolved numbers once known."""
    hyperparameters = row.resolved_hyperparameters or row.options
    method = dict(row.method)
    method_type = method.get("type", "supervised")
    method[method_type] = {**(method.get(method_type) or {}), "hyperparameters": hyperparameters}
    echoed = {k: v for k, v in row.options.items() if k not in Hyperparameters.model_fields}
    return FineTuningJob(
        id=row.id,
        created_at=row.created_at,
        model=row.model,
        organization_id=organization_id,
        status=JobStatus(row.status),
        fine_tuned_model=row.fine_tuned_model,
        finished_at=row.finished_at,
        trained_tokens=row.trained_tokens,
        estimated_finish=row.estimated_finish if row.status == JobStatus.RUNNING else None,
        training_file=row.training_file,
        validation_file=row.validation_file,
        result_files=list(row.result_files or []),
        seed=row.seed,
        hyperparameters=hyperparameters,
        method=method,
        error=JobError(**row.error) if row.error else None,
        integrations=[],
        metadata=row.user_metadata,
        user_provided_suffix=row.suffix,
        evaluation=row.evaluation,
        **echoed,
    )
