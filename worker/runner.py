"""Running one claimed job: resolve its spec, train with callbacks that write through the lease, and end it
as succeeded (published), paused, failed (with a code a user can act on) or not at all (cancelled or lost)."""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from app import ids
from app.db import session_scope
from app.jobs import transitions
from app.jobs.checkpoints import latest_checkpoint
from app.jobs.events import METRIC_NAMES, add_event
from app.jobs.reconcile import give_up, out_of_attempts, pause_if_asked
from app.jobs.spec import resolve_spec
from app.jobs.status import TERMINAL
from app.jobs.storage_keys import checkpoint_key, file_key
from app.ml.adapter_files import lora_shape, read_adapter_config
from app.ml.device import release_memory, start_memory_accounting
from app.model_lookup import find_fine_tuned_model
from app.storage import StorageUnavailable
from app.tables import File, FineTunedModel, Job, JobCheckpoint, Project
from worker.context import WorkerContext
from worker.heartbeat import Heartbeat
from worker.leases import Claim, LeaseLost, claim_job, claimed_job, fenced_session
from worker.publish import publish
from worker.reports import evaluate_fine_tune, report_dropped, report_early_stopping, report_throughput
from worker.training.callbacks import StopRequest, TrainingCallbacks
from worker.training.errors import TrainingError
from worker.training.ranks import RankLost, train_on_devices

log = logging.getLogger("tuneserve.runner")

CHECKPOINT_METRICS = ("step", *METRIC_NAMES)


class JobCallbacks(TrainingCallbacks):
    """The loop's callbacks for a job: every write is fenced by the claim."""

    def __init__(self, ctx: WorkerContext, claim: Claim, heartbeat: Heartbeat, model_name: str):
        self._ctx, self._claim, self._heartbeat, self._model_name = ctx, claim, heartbeat, model_name
        self._pending_metrics: dict[str, Any] | None = None
        self._unwritten: list[tuple[str, dict[str, Any]]] = []
        self._flushed_at = time.monotonic()
        self._flush_every = ctx.settings.job_heartbeat_seconds

    def _write(self) -> AbstractContextManager[Session]:
        return fenced_session(self._ctx.sessionmaker, self._claim, self._ctx.settings)

    def on_metrics(self, row: dict[str, Any]) -> None:
        self._pending_metrics = row  # completed in on_progress, which follows it and knows the step count

    def on_progress(self, step: int, total_steps: int, eta_seconds: float | None) -> None:
        self._heartbeat.eta_seconds = eta_seconds
        row, self._pending_metrics = self._pending_metrics, None
        if row is not None:
            self._unwritten.append(_metrics_event(row, total_steps))
        # One transaction per heartbeat interval, not per step: a step of a small model takes milliseconds.
        if self._unwritten and (step == total_steps or time.monotonic() - self._flushed_at >= self._flush_every):
            self.flush_metrics()

    def flush_metrics(self) -> None:
        events, self._unwritten = self._unwritten, []
        self._flushed_at = time.monotonic()
        if not events:
            return
        try:
            with self._write() as session:
                for message, data in events:
                    add_event(session, self._claim.job_id, message, type="metrics", data=data)
        except LeaseLost:
            self._heartbeat.stop_request = "cancel"

    def on_checkpoint(self, step: int, checkpoint_dir: Path, metrics: dict[str, Any]) -> None:
        self.flush_metrics()  # a checkpoint's events follow the steps before it
        if step == 0:
            return  # paused before the first step: nothing worth keeping
        key = checkpoint_key(self._claim.job_id, self._claim.attempt, step)
        self._ctx.storage.put_dir(key, checkpoint_dir)
        try:
            with self._write() as session:
                exists = session.scalar(
                    select(JobCheckpoint.id).where(
                        JobCheckpoint.job_id == self._claim.job_id, JobCheckpoint.step_number == step
                    )
                )
                if exists:
                    return
                job = claimed_job(session, self._claim)
                model = ids.checkpoint_model_name(self._model_name, step)
                session.add(
                    JobCheckpoint(
                        id=ids.checkpoint_id(),
                        job_id=self._claim.job_id,
                        step_number=step,
                        metrics={k: metrics.get(k) for k in CHECKPOINT_METRICS} | {"step": step},
                        fine_tuned_model_checkpoint=model,
                        storage_key=key,
                    )
                )
                # A checkpoint is a model from the moment it exists, so the name the checkpoint lists is
                # servable whatever becomes of the job (running, cancelled, failed or succeeded).
                session.add(
                    FineTunedModel(
                        id=model,
                        project_id=job.project_id,
                        job_id=job.id,
                        base_model=job.base_model,
                        step_number=step,
                        storage_key=key,
                    )
                )
                add_event(session, self._claim.job_id, f"Checkpoint created at step {step}")
        except LeaseLost:
            self._ctx.storage.delete(key)
            self._heartbeat.stop_request = "cancel"

    def should_stop(self) -> StopRequest:
        return self._heartbeat.stop_request


def _metrics_event(row: dict[str, Any], total_steps: int) -> tuple[str, dict[str, Any]]:
    message = f"Step {row['step']}/{total_steps}: training loss={row['train_loss']:.4f}"
    if row.get("reward_margin") is not None:
        message += f", reward accuracy={row['train_reward_accuracy']:.2f}, reward margin={row['reward_margin']:.4f}"
    if row.get("valid_loss") is not None:
        message += f", validation loss={row['valid_loss']:.4f}"
    data = {k: row[k] for k in CHECKPOINT_METRICS if row.get(k) is not None}
    data["total_steps"] = total_steps
    return message, data


def run_job(ctx: WorkerContext, job_id: str) -> str:
    """Claim and run the job; returns what happened (for logs and tests)."""
    claim = claim_job(ctx.sessionmaker, job_id, ctx.settings)
    if claim is None:
        return "skipped"
    sweep_work_dirs(ctx)  # after the claim, so this job's earlier (killed) attempts count as stale too
    work_dir = ctx.settings.data_dir / "work" / job_id / f"attempt-{claim.attempt}"
    try:
        with Heartbeat(ctx, claim) as heartbeat:
            return _run_claimed(ctx, claim, heartbeat, work_dir)
    except LeaseLost:
        with ctx.sessionmaker() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
        return "cancelled" if status == "cancelled" else "lost"
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        # A worker lives for many jobs: what this one held on the GPU goes back before the next one starts.
        release_memory()


def sweep_work_dirs(ctx: WorkerContext) -> int:
    """Remove the local work directories that no live attempt can need: those of finished (or unknown) jobs,
    and of a job's attempts before its current one. An attempt removes its own directory when it ends; these
    are what killed attempts left. Returns how many were removed."""
    root = ctx.settings.data_dir / "work"
    if not root.is_dir():
        return 0
    job_dirs = {path.name: path for path in root.iterdir() if path.is_dir()}
    if not job_dirs:
        return 0
    with ctx.sessionmaker() as session:
        rows = session.execute(
            select(Job.id, Job.attempt).where(
                Job.id.in_(list(job_dirs)), Job.status.not_in([status.value for status in TERMINAL])
            )
        )
        live = {job_id: attempt for job_id, attempt in rows}
    removed = 0
    for job_id, path in job_dirs.items():
        stale = [path] if job_id not in live else [p for p in path.iterdir() if _attempt(p) < live[job_id]]
        for directory in stale:
            shutil.rmtree(directory, ignore_errors=True)
            removed += 1
    return removed


def _attempt(path: Path) -> int:
    number = path.name.removeprefix("attempt-")
    return int(number) if number.isdigit() else -1


def _run_claimed(ctx: WorkerContext, claim: Claim, heartbeat: Heartbeat, work_dir: Path) -> str:
    with session_scope(ctx.sessionmaker) as session:
        job = claimed_job(session, claim)
        project = session.scalars(select(Project.name).where(Project.id == job.project_id)).one()
        training = session.scalars(select(File).where(File.id == job.training_file)).one()
        resume = latest_checkpoint(session, job.id)
        session.expunge_all()
    model_name = ids.fine_tuned_model_name(job.base_model, project, job.suffix, job.id)
    storage = ctx.storage
    try:
        base = ctx.registry.resolve(job.base_model)
        options, init_adapter = job.options, None
        if job.parent_model:
            options, init_adapter = _continue_from(ctx, job, job.parent_model)
        # A processed training file always has its example count; 0 would fail the job as having no examples.
        spec = resolve_spec(
            options, training.n_examples or 0, defaults=base.defaults, seed=job.seed, method=job.method["type"]
        )
        with fenced_session(ctx.sessionmaker, claim, ctx.settings) as session:
            claimed_job(session, claim).resolved_hyperparameters = spec.to_dict()
        memory_at_start = start_memory_accounting()
        result = train_on_devices(
            ctx.settings.train_devices,
            spec,
            storage.local_file(file_key(job.training_file)),
            storage.local_file(file_key(job.validation_file)) if job.validation_file else None,
            base,
            work_dir,
            JobCallbacks(ctx, claim, heartbeat, model_name),
            resume_from=storage.local_dir(resume.storage_key) if resume else None,
            init_adapter=init_adapter,
        )
        if result.stopped == "pause":
            return _release_paused(ctx, claim, result.n_steps)
        if result.stopped == "cancel":
            return "cancelled"
        report_dropped(ctx, claim, result)
        report_throughput(ctx, claim, result, memory_at_start)
        report_early_stopping(ctx, claim, result)
        evaluation = None
        if job.validation_file and result.adapter_dir is not None:
            validation = storage.local_file(file_key(job.validation_file))
            evaluation = evaluate_fine_tune(ctx, claim, job.base_model, model_name, result.adapter_dir, validation)
        publish(ctx, claim, result, evaluation)
        return "succeeded"
    except TrainingError as exc:
        _fail(ctx, claim, exc.code, exc.message, exc.param)
    except torch.OutOfMemoryError:
        _fail(ctx, claim, "out_of_memory", "Training ran out of memory; lower batch_size or max_seq_length.")
    except RankLost as exc:
        log.warning("job %s attempt %s: %s", claim.job_id, claim.attempt, exc)
        return _requeue_lost_rank(ctx, claim, str(exc))
    except (LeaseLost, DBAPIError, StorageUnavailable) as exc:
        if isinstance(exc, IntegrityError):
            raise
        # Lost the job, the database or the blob store: the lease expires and the reconciler re-drives the job
        # (up to its attempt limit), which resumes from its last checkpoint.
        log.warning("job %s attempt %s stopped: %s", claim.job_id, claim.attempt, exc)
        raise LeaseLost(claim.job_id) from exc
    except Exception as exc:
        log.exception("job %s failed unexpectedly", claim.job_id)
        _fail(ctx, claim, "internal_error", f"Training failed unexpectedly: {type(exc).__name__}: {exc}")
    return "failed"


def _continue_from(ctx: WorkerContext, job: Job, parent_model: str) -> tuple[dict[str, Any], Path]:
    """Options with the parent adapter's LoRA shape, and the adapter to start from."""
    with ctx.sessionmaker() as session:
        parent = find_fine_tuned_model(session, job.project_id, parent_model)
    if parent is None:
        message = f"The model {parent_model} this job continues from was deleted."
        raise TrainingError("model_not_found", message, param="model")
    adapter = ctx.storage.local_dir(parent.storage_key)
    return {**job.options, **lora_shape(read_adapter_config(adapter))}, adapter


def _fail(ctx: WorkerContext, claim: Claim, code: str, message: str, param: str | None = None) -> None:
    with fenced_session(ctx.sessionmaker, claim, ctx.settings) as session:
        transitions.fail(session, claimed_job(session, claim), code, message, param)


def _requeue_lost_rank(ctx: WorkerContext, claim: Claim, reason: str) -> str:
    """A data-parallel rank died under this job: the job goes back to the queue now (not when its lease
    expires) to resume from its last checkpoint, and counts as a lost worker towards its attempt limit."""
    with fenced_session(ctx.sessionmaker, claim, ctx.settings) as session:
        job = claimed_job(session, claim)
        if pause_if_asked(session, job):
            return "paused"  # a pause asked for meanwhile: paused at the last checkpoint, as the reconciler would
        if out_of_attempts(job, ctx.settings):
            give_up(session, job)
            return "failed"
        transitions.requeue(
            session, job, f"The job stopped: {reason}; re-queued to resume from its last checkpoint", worker_lost=True
        )
    ctx.dispatcher.send(claim.job_id)
    return "requeued"


def _release_paused(ctx: WorkerContext, claim: Claim, step: int) -> str:
    """The loop has checkpointed at `step` and stopped: the job is paused now, unless the client withdrew the
    pause meanwhile; then it goes back to the queue and the next claim continues from that checkpoint."""
    with fenced_session(ctx.sessionmaker, claim, ctx.settings) as session:
        job = claimed_job(session, claim)
        if transitions.acknowledge_pause(session, job, step):
            return "paused"
        transitions.requeue(
            session, job, f"Pause withdrawn after the checkpoint at step {step}; re-queued", worker_lost=False
        )
    ctx.dispatcher.send(claim.job_id)
    return "requeued"
