"""GET /metrics in Prometheus' text format."""

from __future__ import annotations

import re

from sqlalchemy import update

from app.tables import Job
from tests.datasets.samples import valid_chat_file


def test_metrics_exposes_jobs_by_status(client):
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert f'tuneserve_jobs{{status="{status}"}} 0' in r.text
    for line in r.text.splitlines():  # every line is a comment or `name{labels} value`
        assert line.startswith("#") or re.fullmatch(
            r'[a-z_][a-z0-9_]*(\{[a-z_]+="[A-Za-z0-9_+.]+"\})? [0-9.e+-]+', line
        ), line
    assert 'tuneserve_inference_batch_size_bucket{le="+Inf"}' in r.text
    assert "# TYPE tuneserve_inference_batch_size histogram" in r.text
    assert "# TYPE tuneserve_inference_adapter_cache_hits_total counter" in r.text


def job_counts(text: str) -> dict[str, int]:
    counts = {}
    for line in text.splitlines():
        if match := re.fullmatch(r'tuneserve_jobs\{status="([a-z_]+)"\} (\d+)', line):
            assert match[1] not in counts, line  # one line per status
            counts[match[1]] = int(match[2])
    return counts


def test_metrics_counts_every_projects_jobs_by_status(app_client, alpha_key, beta_key, sessionmaker):
    def new_jobs(key: str, n: int) -> list[str]:
        app_client.headers["Authorization"] = f"Bearer {key}"
        upload = {"file": ("t.jsonl", valid_chat_file(12))}
        r = app_client.post("/v1/files", data={"purpose": "fine-tune"}, files=upload)
        assert r.status_code == 200, r.text
        body = {"model": "tuneserve-tiny", "training_file": r.json()["id"]}
        return [app_client.post("/v1/fine_tuning/jobs", json=body).json()["id"] for _ in range(n)]

    beta = new_jobs(beta_key, 5)
    alpha = new_jobs(alpha_key, 7)
    for job_id in alpha[:2]:
        assert app_client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    assert app_client.post(f"/v1/fine_tuning/jobs/{alpha[2]}/pause").status_code == 200
    # What workers write: running, succeeded and failed jobs, in both projects.
    worker_states = {
        alpha[3]: "running",
        alpha[4]: "succeeded",
        beta[0]: "succeeded",
        beta[1]: "succeeded",
        beta[2]: "failed",
    }
    with sessionmaker() as session:
        for job_id, status in worker_states.items():
            session.execute(update(Job).where(Job.id == job_id).values(status=status))
        session.commit()

    r = app_client.get("/metrics")
    assert r.status_code == 200
    assert job_counts(r.text) == {
        "validating_files": 0,
        "queued": 4,  # alpha[5], alpha[6], beta[3], beta[4]
        "running": 1,
        "paused": 1,
        "succeeded": 3,
        "failed": 1,
        "cancelled": 2,
    }
