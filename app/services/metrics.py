"""Prometheus text exposition of the service's state: inference engine counters and jobs by status."""

from __future__ import annotations

import re

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.tables import Job

JOB_STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")


def _metric_name(name: str) -> str:
    return "tuneserve_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)


def render(session: Session, engine_metrics: dict[str, float] | None) -> str:
    lines: list[str] = []
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    lines += ["# HELP tuneserve_jobs Fine-tuning jobs by status.", "# TYPE tuneserve_jobs gauge"]
    lines += [f'tuneserve_jobs{{status="{status}"}} {counts.get(status, 0)}' for status in JOB_STATUSES]
    for name, value in sorted((engine_metrics or {}).items()):
        metric = _metric_name(f"inference_{name}")
        kind = "counter" if metric.endswith("_total") else "gauge"
        lines += [f"# TYPE {metric} {kind}", f"{metric} {float(value):g}"]
    return "\n".join(lines) + "\n"
