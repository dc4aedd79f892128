"""The events a finished run adds before it is published: what was left out of training, how fast it ran, what
early stopping decided, and how the fine-tuned model compares with its base (the evaluation report)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.jobs.events import EventLevel, add_event
from app.ml.device import peak_memory_bytes
from worker.context import WorkerContext
from worker.evaluation_report import evaluation_report
from worker.leases import Claim, fenced_session
from worker.training.loop import TrainingResult

log = logging.getLogger("tuneserve.reports")


def report_dropped(ctx: WorkerContext, claim: Claim, result: TrainingResult) -> None:
    notes = []
    if result.n_dropped_too_long:
        notes.append(f"{result.n_dropped_too_long} example(s) longer than max_seq_length were dropped")
    if result.n_truncated:
        notes.append(f"{result.n_truncated} example(s) were truncated from the left to fit max_seq_length")
    if result.n_dropped_no_supervised:
        notes.append(f"{result.n_dropped_no_supervised} example(s) had no trained token left and were dropped")
    if notes:
        with fenced_session(ctx.sessionmaker, claim, ctx.settings) as session:
            add_event(session, claim.job_id, "; ".join(notes).capitalize() + ".", level="warn")


def report_throughput(
    ctx: WorkerContext, claim: Claim, result: TrainingResult, memory_at_start: dict[str, int]
) -> None:
    """One event with this run's training speed and, on a GPU, its peak memory and what the worker held when the
    job started (about nothing, when the jobs before it released theirs)."""
    seconds = result.train_seconds
    data: dict[str, Any] = {
        "trained_tokens": result.run_tokens,
        "train_seconds": round(seconds, 4),
        "tokens_per_second": round(result.run_tokens / seconds, 1) if seconds > 0 else None,
    }
    message = f"Trained {result.run_tokens:,} tokens in {seconds:.1f} s"
    if seconds > 0:
        message += f" ({result.run_tokens / seconds:,.0f} tokens/s)"
    peak = peak_memory_bytes()
    if peak is not None:
        data.update(peak_memory_bytes=peak, **{f"{k}_at_start": v for k, v in memory_at_start.items()})
        message += f"; peak GPU memory {peak / 2**30:.2f} GiB"
    with fenced_session(ctx.sessionmaker, claim, ctx.settings) as session:
        add_event(session, claim.job_id, message, data=data)


def report_early_stopping(ctx: WorkerContext, claim: Claim, result: TrainingResult) -> None:
    """Which step's weights are published, and why, when the job asked for early stopping."""
    if result.early_stopping is None:
        return
    message = f"{result.early_stopping}. The published model is the checkpoint at step {result.best_step}"
    if result.full_valid_loss is not None:
        message += f" (full validation loss {result.full_valid_loss:.4f})"
    data = {"best_step": result.best_step, "stopped_at_step": result.n_steps, "full_valid_loss": result.full_valid_loss}
    with fenced_session(ctx.sessionmaker, claim, ctx.settings) as session:
        add_event(session, claim.job_id, message + ".", data=data)


def evaluate_fine_tune(
    ctx: WorkerContext, claim: Claim, base_model: str, model_name: str, adapter_dir: Path, validation: Path
) -> dict[str, Any] | None:
    """The evaluation report, with an event that sums it up. A report that cannot be made is said in a warning
    event, and the model is published without it: the training it reports on succeeded."""
    level: EventLevel = "info"
    try:
        report = evaluation_report(ctx.registry, base_model, model_name, adapter_dir, validation)
    except Exception as exc:
        log.exception("job %s: the evaluation report failed", claim.job_id)
        message, level, report = f"The evaluation report could not be made: {type(exc).__name__}: {exc}", "warn", None
    else:
        if report is None:
            message, level = "No validation example ends with a text answer: no evaluation report.", "warn"
        else:
            s = report["summary"]
            base, tuned = s["base"], s["fine_tuned"]
            message = (
                f"Evaluation on {s['n_examples']} validation example(s), greedy: exact match "
                f"{base['exact_match']:.0%} (base) -> {tuned['exact_match']:.0%} (fine-tuned), token F1 "
                f"{base['token_f1']:.2f} -> {tuned['token_f1']:.2f}"
            )
    with fenced_session(ctx.sessionmaker, claim, ctx.settings) as session:
        add_event(session, claim.job_id, message, level=level, data=report["summary"] if report else None)
    return report
