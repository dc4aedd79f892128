"""The fine-tuning jobs API's rules: creation checks, listing, and the state changes a client may ask for.

The moves themselves are the job domain's (app/jobs/transitions.py), shared with the worker's side of the
lifecycle (claim, heartbeat, publish: worker/leases.py, worker/runner.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import ids
from app.datasets.report import MIN_EXAMPLES
from app.errors import InvalidRequest, NotFound
from app.jobs import transitions
from app.jobs.broker import JobDispatcher
from app.jobs.events import METRIC_NAMES, add_event
from app.jobs.spec import DEFAULT_SEED, TrainingSpec, resolve_spec
from app.jobs.status import JobStatus
from app.ml.registry import BaseModelRegistry
from app.model_lookup import find_fine_tuned_model
from app.schemas.jobs import CreateJobRequest, Hyperparameters
from app.services.base_model_fit import check_conversations_fit, check_lora_fits
from app.services.files import get_file
from app.services.keys import CurrentProject
from app.services.pagination import Page, keyset_page
from app.storage import Storage
from app.tables import File, Job, JobCheckpoint, JobEvent

SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
# Engine options a request may give, at the top level (the SDK's extra_body) or among the hyperparameters.
ENGINE_OPTIONS = frozenset(TrainingSpec.__dataclass_fields__) - {"learning_rate", "auto", "seed", "method"} | {
    "r",
    "alpha",
    "dropout",
}
# A job that continues from a fine-tuned model keeps that adapter's shape.
LORA_SHAPE_OPTIONS = frozenset({"lora_r", "r", "lora_alpha", "alpha", "target_modules", "use_rslora"})
# Which data formats each method trains on.
METHOD_FORMATS = {"supervised": ("chat", "prompt_completion"), "dpo": ("preference",)}


def _check_training_files(
    session: Session, project: CurrentProject, request: CreateJobRequest, method: str
) -> tuple[File, File | None]:
    training = get_file_param(session, project, request.training_file, "training_file")
    validation = None
    if request.validation_file:
        if request.validation_file == request.training_file:
            raise InvalidRequest("The validation file must differ from the training file.", param="validation_file")
        validation = get_file_param(session, project, request.validation_file, "validation_file")
    for row, param in ((training, "training_file"), (validation, "validation_file")):
        if row is None:
            continue
        if row.purpose != "fine-tune" or row.status != "processed":
            raise InvalidRequest(
                f"File {row.id} has purpose {row.purpose!r} and status {row.status!r}; "
                "fine-tuning needs a processed file uploaded with purpose 'fine-tune'.",
                param=param,
                code="invalid_file",
            )
        if row.format not in METHOD_FORMATS[method]:
            raise InvalidRequest(
                f"File {row.id} holds {row.format} examples; the {method} method trains on "
                f"{' or '.join(METHOD_FORMATS[method])} examples.",
                param=param,
                code="invalid_file_format",
            )
    if (training.n_examples or 0) < MIN_EXAMPLES:  # a processed fine-tune file always has its count
        raise InvalidRequest(
            f"Training file has {training.n_examples} example(s), but must have at least {MIN_EXAMPLES} examples",
            param="training_file",
            code="invalid_n_examples",
        )
    return training, validation


def get_file_param(session: Session, project: CurrentProject, file_id: str, param: str) -> File:
    try:
        return get_file(session, project, file_id, lock=True)  # a delete waits until this job is committed
    except NotFound:
        raise InvalidRequest(f"File {file_id} does not exist.", param=param, code="file_not_found") from None


def _resolve_model(
    session: Session, project: CurrentProject, registry: BaseModelRegistry, model: str
) -> tuple[str, str | None]:
    """(base model name, parent fine-tuned model or None)."""
    if model in registry.names():
        return model, None
    parent = find_fine_tuned_model(session, project.id, model)
    if parent is not None:
        return parent.base_model, parent.id
    raise InvalidRequest(
        f"Model {model!r} is not a base model ({', '.join(registry.names())}) or a fine-tuned model of this project.",
        param="model",
        code="model_not_found",
    )


def _requested_options(request: CreateJobRequest) -> tuple[str, dict]:
    """The method type and every hyperparameter as requested, merged from the three places clients put them."""
    method = request.method.type if request.method else "supervised"
    if method not in METHOD_FORMATS:
        raise InvalidRequest(
            f"The {method} method is not supported; use 'supervised' or 'dpo'.",
            param="method.type",
            code="unsupported_method",
        )
    options = dict(request.hyperparameters or {})
    if request.method:
        other = request.method.dpo if method == "supervised" else request.method.supervised
        if other is not None:
            raise InvalidRequest(
                f"method.{'dpo' if method == 'supervised' else 'supervised'} does not apply to method type {method}.",
                param="method",
            )
    in_method = request.method and (request.method.supervised if method == "supervised" else request.method.dpo)
    if in_method and in_method.hyperparameters:
        if request.hyperparameters:
            raise InvalidRequest(
                "Give hyperparameters either in 'method' or at the top level, not both.", param="hyperparameters"
            )
        options = dict(in_method.hyperparameters)
    for key, value in (request.model_extra or {}).items():
        if key not in ENGINE_OPTIONS:
            raise InvalidRequest(f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")
        options[key] = value
    for key in Hyperparameters.model_fields:
        options.setdefault(key, "auto")
    return method, options


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(f"metadata holds at most {MAX_METADATA_PAIRS} pairs.", param="metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise InvalidRequest(
                f"metadata keys are at most {MAX_METADATA_KEY} and values {MAX_METADATA_VALUE} characters.",
                param=f"metadata.{key[:64]}",
            )


def create_job(
    session: Session,
    project: CurrentProject,
    registry: BaseModelRegistry,
    storage: Storage,
    request: CreateJobRequest,
    *,
    max_lora_rank: int,
) -> Job:
    """Check the request, then record the job as queued with its events. The caller commits, then dispatches."""
    if request.suffix is not None and not SUFFIX_PATTERN.match(request.suffix):
        raise InvalidRequest("suffix must be 1-64 characters of A-Z, a-z, 0-9, '-', '_' and '.'.", param="suffix")
    _check_metadata(request.metadata)
    method, options = _requested_options(request)
    base, parent = _resolve_model(session, project, registry, request.model)
    if parent is not None:
        for key in LORA_SHAPE_OPTIONS & options.keys():
            raise InvalidRequest(
                f"{key} cannot be set when continuing from {parent}: the LoRA shape is the model's own.",
                param=f"hyperparameters.{key}",
            )
    training, validation = _check_training_files(session, project, request, method)
    seed = request.seed if request.seed is not None else DEFAULT_SEED
    # The same resolution the worker will do, so out-of-range values fail now rather than in the job.
    spec = resolve_spec(options, training.n_examples or 0, seed=seed, method=method)
    if spec.early_stopping and validation is None:
        raise InvalidRequest(
            "early_stopping decides on the validation loss: give a validation_file.", param="early_stopping"
        )
    base_info = registry.resolve(base)
    if parent is None:  # a continued job keeps its parent's LoRA shape, which was checked then
        check_lora_fits(base_info, spec.target_modules, spec.lora_r, max_lora_rank)
    files = [(training, "training_file")] + ([(validation, "validation_file")] if validation else [])
    check_conversations_fit(storage, base_info, files)

    job = Job(
        id=ids.job_id(),
        project_id=project.id,
        model=request.model,
        base_model=base,
        parent_model=parent,
        training_file=training.id,
        validation_file=validation.id if validation else None,
        suffix=request.suffix,
        seed=seed,
        method={"type": method},
        options=options,
        user_metadata=request.metadata,
        status=JobStatus.QUEUED.value,
        result_files=[],
        attempt=0,
        # Counted as sent from the commit on: the caller sends right after, and if that send is lost the
        # reconciler sends again once this is old enough.
        dispatched_at=time.time(),
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Created fine-tuning job: {job.id}")
    add_event(session, job.id, f"Validating training file: {training.id}")
    if validation:
        add_event(session, job.id, f"Validating validation file: {validation.id}")
    add_event(session, job.id, "Files validated, moving job to queued state")
    return job


def get_job(session: Session, project: CurrentProject, job_id: str, *, for_update: bool = False) -> Job:
    query = select(Job).where(Job.id == job_id, Job.project_id == project.id)
    if for_update:
        query = query.with_for_update()
    job = session.scalar(query)
    if job is None:
        raise NotFound(f"Could not find fine-tuning job {job_id}.", param="fine_tuning_job_id", code="job_not_found")
    return job


def list_jobs(
    session: Session, project: CurrentProject, *, after: str | None, limit: int, metadata: dict[str, str]
) -> Page:
    query = select(Job).where(Job.project_id == project.id)
    for key, value in metadata.items():
        query = query.where(Job.user_metadata[key].as_string() == value)
    after_seq = get_job(session, project, after).seq if after else None
    return keyset_page(session, query, Job.seq, after=after_seq, limit=limit)


def list_events(session: Session, project: CurrentProject, job_id: str, *, after: str | None, limit: int) -> Page:
    get_job(session, project, job_id)
    after_seq = _event_seq(session, job_id, after) if after else None
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    return keyset_page(session, query, JobEvent.seq, after=after_seq, limit=limit)


def _event_seq(session: Session, job_id: str, event_id: str) -> int:
    """The position of the job's event `event_id` (a cursor a client passes as `after`)."""
    seq = session.scalar(select(JobEvent.seq).where(JobEvent.id == event_id, JobEvent.job_id == job_id))
    if seq is None:
        raise NotFound(f"No event {event_id} in job {job_id}.", param="after")
    return seq


def job_metrics(
    session: Session, project: CurrentProject, job_id: str, *, after: str | None, limit: int
) -> tuple[dict[str, list[int | float | None]], str | None, bool]:
    """The job's metric events after the event `after`, oldest first, as columns: `step` and each of METRIC_NAMES
    that any of them has (None where one has not), values to 6 significant digits (a chart needs no more, and
    10,000 steps stay small). Returns (columns, the last event's id, whether more follow)."""
    get_job(session, project, job_id)
    query = select(JobEvent.seq, JobEvent.id, JobEvent.data).where(
        JobEvent.job_id == job_id, JobEvent.type == "metrics"
    )
    if after:
        query = query.where(JobEvent.seq > _event_seq(session, job_id, after))
    rows = session.execute(query.order_by(JobEvent.seq).limit(limit + 1)).all()
    has_more, rows = len(rows) > limit, rows[:limit]
    points = [row.data or {} for row in rows]
    names = [name for name in ("step", *METRIC_NAMES) if any(name in point for point in points)]
    columns = {name: [_significant(point.get(name)) for point in points] for name in names}
    return columns, (rows[-1].id if rows else after), has_more


def _significant(value: int | float | None) -> int | float | None:
    return None if value is None else float(f"{value:.6g}") if isinstance(value, float) else value


def list_checkpoints(session: Session, project: CurrentProject, job_id: str, *, after: str | None, limit: int) -> Page:
    get_job(session, project, job_id)
    after_seq = None
    if after:
        after_seq = session.scalar(
            select(JobCheckpoint.seq).where(JobCheckpoint.id == after, JobCheckpoint.job_id == job_id)
        )
        if after_seq is None:
            raise NotFound(f"No checkpoint {after} in job {job_id}.", param="after")
    query = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
    return keyset_page(session, query, JobCheckpoint.seq, after=after_seq, limit=limit)


def wake_worker(dispatcher: JobDispatcher, job: Job) -> None:
    """Send a queued job to the workers; call after the commit that queued it."""
    if job.status == JobStatus.QUEUED:
        dispatcher.send(job.id)


def _illegal(job: Job, action: str) -> InvalidRequest:
    return InvalidRequest(
        f"Cannot {action} job {job.id}: it is {job.status}.", param="fine_tuning_job_id", code="invalid_job_state"
    )


def _act(session: Session, project: CurrentProject, job_id: str, move: Callable[[Session, Job], bool]) -> Job:
    """Lock the job's row, then move it. On Postgres the lock makes a refused move one not allowed now; SQLite
    takes no row lock, so a worker may have moved the job since it was read: read it again and decide once more."""
    job = get_job(session, project, job_id, for_update=True)
    if move(session, job):
        return job
    session.refresh(job)
    if not move(session, job):
        raise _illegal(job, move.__name__)
    return job


def cancel_job(session: Session, project: CurrentProject, job_id: str) -> Job:
    return _act(session, project, job_id, transitions.cancel)


def pause_job(session: Session, project: CurrentProject, job_id: str) -> Job:
    """A queued job pauses at once; a running one reads as running until its worker has checkpointed."""
    return _act(session, project, job_id, transitions.pause)


def resume_job(session: Session, project: CurrentProject, job_id: str) -> Job:
    """A paused job is queued again; resuming a running job whose pause is pending withdraws the pause."""
    return _act(session, project, job_id, transitions.resume)
