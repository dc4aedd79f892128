"""Prometheus text exposition of the service's state: inference engine counters and jobs by status."""

from __future__ import annotations

import re

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.jobs.status import JobStatus
from app.tables import Job

BUCKET = re.compile(r"^(?P<family>.+)_bucket_le_(?P<le>\w+)$")


def _metric_name(name: str) -> str:
    return "tuneserve_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _engine_lines(values: dict[str, float]) -> list[str]:
    """Flat engine counters as Prometheus families: `x_bucket_le_N` (+ `x_sum`, `x_count`) is a histogram
    with `le` labels, other `_sum`/`_count` pairs summaries, `_total` counters, the rest gauges."""
    buckets: dict[str, list[tuple[str, float]]] = {}
    for name, value in values.items():
        if match := BUCKET.match(name):
            le = "+Inf" if match["le"] == "inf" else match["le"]
            buckets.setdefault(match["family"], []).append((le, value))
    lines: list[str] = []
    done: set[str] = set()
    for family, points in sorted(buckets.items()):
        metric = _metric_name(f"inference_{family}")
        lines.append(f"# TYPE {metric} histogram")
        points.sort(key=lambda p: float("inf") if p[0] == "+Inf" else float(p[0]))
        lines += [f'{metric}_bucket{{le="{le}"}} {float(v):g}' for le, v in points]
        for suffix in ("sum", "count"):
            lines.append(f"{metric}_{suffix} {float(values.get(f'{family}_{suffix}', 0)):g}")
            done.add(f"{family}_{suffix}")
    for name, value in sorted(values.items()):
        if name in done or BUCKET.match(name):
            continue
        metric = _metric_name(f"inference_{name}")
        if name.endswith(("_sum", "_count")):
            family = _metric_name(f"inference_{name.rsplit('_', 1)[0]}")
            if f"# TYPE {family} summary" not in lines:
                lines.append(f"# TYPE {family} summary")
        else:
            lines.append(f"# TYPE {metric} {'counter' if name.endswith('_total') else 'gauge'}")
        lines.append(f"{metric} {float(value):g}")
    return lines


def render(session: Session, engine_metrics: dict[str, float] | None) -> str:
    lines: list[str] = []
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    lines += ["# HELP tuneserve_jobs Fine-tuning jobs by status.", "# TYPE tuneserve_jobs gauge"]
    lines += [f'tuneserve_jobs{{status="{status}"}} {counts.get(status, 0)}' for status in JobStatus]
    lines += _engine_lines(engine_metrics or {})
    return "\n".join(lines) + "\n"
